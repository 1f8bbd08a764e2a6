// TLS for both transports, from the TQ_TLS_* paths in the configuration: the coordinator's
// gRPC server (optionally requiring worker certificates), the HTTP servers, and a worker's
// channel. Files are read when a role starts, so that a wrong path stops it with an error
// naming the option rather than failing the first handshake.
import { readFileSync } from "node:fs";
import { isIP } from "node:net";
import type { ConnectionOptions } from "node:tls";
import * as grpc from "@grpc/grpc-js";
import type { TLSOptions } from "bun";
import { type Config, ConfigError } from "./config";

type PathOption = "TQ_TLS_CERT" | "TQ_TLS_KEY" | "TQ_TLS_CLIENT_CA" | "TQ_TLS_CA" | "TQ_TLS_CLIENT_CERT" | "TQ_TLS_CLIENT_KEY";

const REASONS: Record<string, string> = {
  ENOENT: "no such file",
  EACCES: "permission denied",
  EISDIR: "is a directory",
};

/** The PEM file an option names, or null when it is unset. */
function readPem(config: Config, option: PathOption): Buffer | null {
  const path = config[option];
  if (!path) return null;
  let content: Buffer;
  try {
    content = readFileSync(path);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? "";
    throw new ConfigError(`${option}=${path}: ${REASONS[code] ?? (error as Error).message}`);
  }
  if (!content.includes("-----BEGIN ")) throw new ConfigError(`${option}=${path}: not a PEM file`);
  return content;
}

/** A file loadConfig guarantees is set whenever its partner is. */
function requirePem(config: Config, option: PathOption): Buffer {
  const pem = readPem(config, option);
  if (!pem) throw new ConfigError(`invalid configuration: ${option} is required here`);
  return pem;
}

/** Whether this process serves HTTP and gRPC over TLS. */
export function tlsEnabled(config: Config): boolean {
  return Boolean(config.TQ_TLS_CERT);
}

/** The scheme of the URLs this process serves, for its log lines. */
export function httpScheme(config: Config): "https" | "http" {
  return tlsEnabled(config) ? "https" : "http";
}

/**
 * The coordinator's gRPC credentials: plaintext without TQ_TLS_CERT; with TQ_TLS_CLIENT_CA,
 * every worker must present a certificate that CA signed.
 */
export function grpcServerCredentials(config: Config): grpc.ServerCredentials {
  if (!tlsEnabled(config)) return grpc.ServerCredentials.createInsecure();
  const pair = { cert_chain: requirePem(config, "TQ_TLS_CERT"), private_key: requirePem(config, "TQ_TLS_KEY") };
  const clientCa = readPem(config, "TQ_TLS_CLIENT_CA");
  return grpc.ServerCredentials.createSsl(clientCa, [pair], clientCa !== null);
}

/**
 * Options for Bun.serve (Elysia's listen), or undefined for plain HTTP. Client certificates
 * are not asked for here: TQ_TLS_CLIENT_CA guards the gRPC port only.
 */
export function httpTls(config: Config): TLSOptions | undefined {
  if (!tlsEnabled(config)) return undefined;
  // The contents, not Bun.file(path): read (and checked) now, not at the first connection.
  return { cert: requirePem(config, "TQ_TLS_CERT").toString(), key: requirePem(config, "TQ_TLS_KEY").toString() };
}

/**
 * A worker's channel credentials: TLS when TQ_TLS_CA or a client certificate is set, trusting
 * TQ_TLS_CA (or the system's CAs without it); plaintext otherwise.
 */
export function grpcClientCredentials(config: Config): grpc.ChannelCredentials {
  if (!config.TQ_TLS_CA && !config.TQ_TLS_CLIENT_CERT) return grpc.credentials.createInsecure();
  return channelTls(readPem(config, "TQ_TLS_CA"), readPem(config, "TQ_TLS_CLIENT_KEY"), readPem(config, "TQ_TLS_CLIENT_CERT"));
}

/**
 * Credentials for `bun start`'s own workers, which dial this same process: they follow the
 * server side. Without TQ_TLS_CA they trust TQ_TLS_CERT itself, which is how a self-signed
 * certificate gets verified (a CA-issued one needs TQ_TLS_CA, or its chain up to the root in
 * TQ_TLS_CERT). Under mutual TLS they present TQ_TLS_CLIENT_CERT, which must then be set.
 */
export function inProcessWorkerCredentials(config: Config): grpc.ChannelCredentials {
  if (!tlsEnabled(config)) return grpc.credentials.createInsecure();
  if (config.TQ_TLS_CLIENT_CA && !config.TQ_TLS_CLIENT_CERT) {
    throw new ConfigError(
      "invalid configuration: with TQ_TLS_CLIENT_CA, `bun start` needs TQ_TLS_CLIENT_CERT and TQ_TLS_CLIENT_KEY for its own workers",
    );
  }
  return channelTls(
    readPem(config, "TQ_TLS_CA") ?? requirePem(config, "TQ_TLS_CERT"),
    readPem(config, "TQ_TLS_CLIENT_KEY"),
    readPem(config, "TQ_TLS_CLIENT_CERT"),
  );
}

/**
 * grpc.credentials.createSsl, made to work with coordinators addressed by IP. grpc-js sends
 * the target host as the TLS server name (SNI) even when it is an IP address, which RFC 6066
 * forbids and Bun's tls.connect refuses outright ("Setting the TLS ServerName to an IP
 * address is not permitted"), so no worker could dial 127.0.0.1:50051 over TLS. We drop such
 * a server name from the options grpc-js built; the certificate is still checked against the
 * host (its IP subjectAltName). Should grpc-js rename that internal field, nothing is dropped
 * and the error comes back: verification is never weakened.
 */
function channelTls(ca: Buffer | null, key: Buffer | null, cert: Buffer | null): grpc.ChannelCredentials {
  const credentials = grpc.credentials.createSsl(ca, key, cert);
  const createConnector = credentials._createSecureConnector.bind(credentials);
  credentials._createSecureConnector = (target, options, callCredentials) => {
    const connector = createConnector(target, options, callCredentials);
    const tls = (connector as unknown as { connectionOptions?: ConnectionOptions }).connectionOptions;
    if (tls?.servername && isIP(tls.servername)) delete tls.servername;
    return connector;
  };
  return credentials;
}
