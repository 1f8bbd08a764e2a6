#!/bin/bash
# The worker's watchdog, its watching half (src/worker/watchdog.ts starts it; it is bash for
# `read -t`): a few MB of RSS and no wake-ups but the worker's beats. It keeps the last state
# line the worker sent ("<pgid> <pgid>...<TAB><json>"; an empty line is a beat). When the pipe
# ends (the worker died) or the beats stop for the bound while the worker is stopped (SIGSTOP:
# state T), or for four bounds in any case (hung), it SIGKILLs the frozen worker and every
# process group listed, at once, and hands the state to the Bun half
# (src/worker/watchdog-process.ts), which kills what left the groups (cgroups), waits until
# nothing runs, and reports the attempts stopped.
#
# usage: watchdog.sh <silence seconds> <worker pid> <command...>  (the command gets "exited" or
# "frozen" and the number of silent bounds appended, and the state line on its stdin)
silence=$1
worker=$2
shift 2
state=
partial=
bounds=0
how=exited
while :; do
  line=
  IFS= read -r -t "$silence" line
  status=$?
  if [ "$status" -eq 0 ]; then
    line=$partial$line
    partial=
    bounds=0
    [ -n "$line" ] && state=$line
    continue
  fi
  if [ "$status" -gt 128 ]; then
    # Timed out; what was read of a line so far is kept for its rest.
    partial=$partial$line
    bounds=$((bounds + 1))
    stat=
    read -r stat </proc/"$worker"/stat 2>/dev/null
    stat=${stat##*) }
    stat=${stat%% *}
    if [ "$stat" = T ] || [ "$stat" = t ] || [ "$bounds" -ge 4 ]; then
      how=frozen
      break
    fi
    continue
  fi
  break # end of file: the worker is gone
done
[ "$how" = frozen ] && kill -KILL "$worker" 2>/dev/null
pgids=${state%%$'\t'*}
[ "$pgids" = "$state" ] && pgids=
for pgid in $pgids; do kill -KILL -- "-$pgid" 2>/dev/null; done
exec "$@" "$how" "$bounds" <<<"$state"
