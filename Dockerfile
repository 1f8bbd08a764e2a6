# One image for every role; the command picks the role (docker-compose.yml overrides it).
# The Bun version matches the bun-types pin in package.json; test/unit/containers.test.ts
# fails if they drift.

FROM oven/bun:1.4.5-slim AS deps
WORKDIR /app
COPY package.json bun.lock ./
# --frozen-lockfile: the image runs exactly the dependency versions the repository was tested
# with. embedded-postgres comes along as a runtime dependency though containers never use it.
RUN bun install --frozen-lockfile --production

FROM oven/bun:1.4.5-slim
WORKDIR /app
# Servers bind every interface so other containers (and published ports) can reach them.
# The compose file runs the API roles on a read-only root: Bun's runtime transpiler cache,
# written under the user's home otherwise, is off (the sources are transpiled at each start).
ENV NODE_ENV=production \
    TQ_HOST=0.0.0.0 \
    BUN_RUNTIME_TRANSPILER_CACHE_PATH=0
# Files stay owned by root: the roles only read them, and the worker's tasks, which run as
# the same user, cannot rewrite the code that runs them.
COPY --from=deps /app/node_modules ./node_modules
COPY package.json bun.lock tsconfig.json ./
COPY src ./src
# The slim (Debian) base provides /bin/sh, which the worker needs to run `sh -c <command>`.
USER bun
EXPOSE 8080 8081 50051
CMD ["bun", "run", "coordinator"]
