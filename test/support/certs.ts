// Throwaway certificates for TLS tests, made with the openssl CLI in a temporary folder: a CA,
// a server certificate for localhost and 127.0.0.1 and a client certificate it signed; a
// second, unrelated CA (and a client certificate it signed) that must not be trusted in its
// place; and a self-signed server certificate. EC P-256 keeps it fast (about 0.2 s in all).
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface TestCerts {
  dir: string;
  /** The CA that signed the server and client certificates. */
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  /** A CA unrelated to `ca`, and a client certificate it signed. */
  otherCa: string;
  otherClientCert: string;
  otherClientKey: string;
  /** A server certificate for localhost and 127.0.0.1 that signs itself, as `bun start` users make. */
  selfSignedCert: string;
  selfSignedKey: string;
  /** Deletes the folder. */
  remove(): void;
}

function openssl(dir: string, args: string[]): void {
  const result = Bun.spawnSync(["openssl", ...args], { cwd: dir, stdout: "pipe", stderr: "pipe" });
  if (result.exitCode !== 0) {
    throw new Error(`openssl ${args.join(" ")} failed (${result.exitCode}): ${result.stderr.toString()}`);
  }
}

const EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

// Our own extension sections, so that the system's openssl.cnf defaults add nothing.
const EXTENSIONS = `
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1SERVER_EXTRA_IPS
authorityKeyIdentifier = keyid

# What openssl req -x509 -addext subjectAltName=... makes with the stock openssl.cnf.
[self]
basicConstraints = critical, CA:TRUE
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = DNS:localhost, IP:127.0.0.1

[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
`;

function makeCa(dir: string, name: string): void {
  openssl(dir, [
    "req",
    "-x509",
    ...EC_KEY,
    "-keyout",
    `${name}.key`,
    "-out",
    `${name}.pem`,
    "-days",
    "2",
    "-subj",
    `/CN=${name}`,
    "-config",
    "ext.cnf",
    "-extensions",
    "ca",
  ]);
}

function makeLeaf(dir: string, name: string, caName: string, extensions: string, serial: number): void {
  openssl(dir, [
    "req",
    "-new",
    ...EC_KEY,
    "-keyout",
    `${name}.key`,
    "-out",
    `${name}.csr`,
    "-subj",
    `/CN=${name}`,
    "-config",
    "ext.cnf",
  ]);
  openssl(dir, [
    "x509",
    "-req",
    "-in",
    `${name}.csr`,
    "-CA",
    `${caName}.pem`,
    "-CAkey",
    `${caName}.key`,
    "-set_serial",
    String(serial),
    "-days",
    "2",
    "-out",
    `${name}.pem`,
    "-extfile",
    "ext.cnf",
    "-extensions",
    extensions,
  ]);
}

/** `serverIps`: more addresses the server certificate is valid for (e.g. a veth's, test/support/netns.ts). */
export function makeTestCerts(options: { serverIps?: readonly string[] } = {}): TestCerts {
  const dir = mkdtempSync(join(tmpdir(), "tq-certs-"));
  try {
    // `req` wants a distinguished_name section even when -subj gives the name.
    const extraIps = (options.serverIps ?? []).map((ip) => `, IP:${ip}`).join("");
    writeFileSync(
      join(dir, "ext.cnf"),
      `[req]\ndistinguished_name = dn\n[dn]\n${EXTENSIONS.replace("SERVER_EXTRA_IPS", extraIps)}`,
    );
    makeCa(dir, "ca");
    makeCa(dir, "other-ca");
    makeLeaf(dir, "server", "ca", "server", 1001);
    makeLeaf(dir, "client", "ca", "client", 1002);
    makeLeaf(dir, "other-client", "other-ca", "client", 1003);
    openssl(dir, [
      "req",
      "-x509",
      ...EC_KEY,
      "-keyout",
      "self-signed.key",
      "-out",
      "self-signed.pem",
      "-days",
      "2",
      "-subj",
      "/CN=localhost",
      "-config",
      "ext.cnf",
      "-extensions",
      "self",
    ]);
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  const at = (file: string) => join(dir, file);
  return {
    dir,
    ca: at("ca.pem"),
    serverCert: at("server.pem"),
    serverKey: at("server.key"),
    clientCert: at("client.pem"),
    clientKey: at("client.key"),
    otherCa: at("other-ca.pem"),
    otherClientCert: at("other-client.pem"),
    otherClientKey: at("other-client.key"),
    selfSignedCert: at("self-signed.pem"),
    selfSignedKey: at("self-signed.key"),
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}
