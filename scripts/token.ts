// bun run token: placeholder replaced in the next commit.
console.error("token: not built yet");
process.exit(2);
