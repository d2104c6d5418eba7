import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { chmod, link, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import ssh2 from 'ssh2';
import { BangerError } from '../../errors.js';
import { Files } from '../../paths.js';
import { errnoCode as errno } from '../exec/errno.js';

const { utils } = ssh2;

export interface UserKey {
  privateKeyPath: string;
  publicKeyPath: string;
  privateKey: Buffer;
  /** One line, `ssh-ed25519 AAAA... banger`, no trailing newline. */
  publicKey: string;
}

/** Accepted for the callers' sake: keys are made in-process now, so nothing here is run or aborted. */
/** Reads a private key and derives its public line (the OpenSSH private key format carries the public blob). */
function publicLineFromPrivate(privateKey: Buffer, path: string, comment: string): string {
  const parsed = utils.parseKey(privateKey);
  const key = Array.isArray(parsed) ? parsed[0] : parsed;
  if (!key || key instanceof Error) {
    throw new BangerError(
      'invalid_state',
      `banger's SSH private key ${path} could not be read: ${key instanceof Error ? key.message : 'no key'}`,
      `move it aside and banger makes a new one (running VMs keep the old key in their authorized_keys)`,
    );
  }
  return `${key.type} ${key.getPublicSSH().toString('base64')} ${comment}`;
}

/**
 * banger's own SSH key pair (ed25519, no passphrase), made on first use in `keysDir` (mode 0700).
 * Idempotent and safe when two processes race: each generates into its own temp directory and the
 * private key is published with link(2), which fails if another process got there first; the loser
 * throws its pair away and reads the winner's. The .pub file is (re)derived from the private key if it
 * is missing or does not match.
 */
export async function ensureUserKey(keysDir: string): Promise<UserKey> {
  const privateKeyPath = join(keysDir, Files.userKey);
  const publicKeyPath = join(keysDir, Files.userPubKey);
  await mkdir(keysDir, { recursive: true, mode: 0o700 });
  await chmod(keysDir, 0o700);

  let privateKey = await readFile(privateKeyPath).catch((e) => {
    if (errno(e) === 'ENOENT') return undefined;
    throw e;
  });
  if (!privateKey) {
    const tmp = join(keysDir, `.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
    await mkdir(tmp, { mode: 0o700 });
    try {
      const tmpKey = join(tmp, Files.userKey);
      await writeFile(tmpKey, newEd25519KeyPair('banger').privateKey, { mode: 0o600 });
      try {
        await link(tmpKey, privateKeyPath);
      } catch (e) {
        if (errno(e) === 'EEXIST') {
          /* another process won the race: use its key */
        } else if (errno(e) === 'EPERM' || errno(e) === 'ENOTSUP' || errno(e) === 'EXDEV') {
          // File systems without hard links: rename (a racing loser may replace the key; both are valid
          // keys and the .pub is derived from whichever private key is on disk).
          await rename(tmpKey, privateKeyPath);
        } else {
          throw e;
        }
      }
    } finally {
      await rm(tmp, { recursive: true, force: true });
    }
    privateKey = await readFile(privateKeyPath);
  }

  const publicKey = publicLineFromPrivate(privateKey, privateKeyPath, 'banger');
  const onDisk = await readFile(publicKeyPath, 'utf8').catch(() => '');
  if (!samePublicKey(onDisk, publicKey)) {
    const tmpPub = `${publicKeyPath}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    await writeFile(tmpPub, `${publicKey}\n`, { mode: 0o644 });
    await rename(tmpPub, publicKeyPath);
  }
  return { privateKeyPath, publicKeyPath, privateKey, publicKey };
}

function samePublicKey(a: string, b: string): boolean {
  try {
    const x = parsePublicKey(a);
    const y = parsePublicKey(b);
    return x.type === y.type && x.blob.equals(y.blob);
  } catch {
    return false;
  }
}

export interface HostKey {
  /** OpenSSH PEM-ish private key text, as sshd reads it from /etc/ssh/ssh_host_ed25519_key. */
  privateKey: string;
  /** One line, `ssh-ed25519 AAAA... comment`, no trailing newline. */
  publicKey: string;
}

/**
 * A fresh ed25519 key pair in OpenSSH formats (the private key as ssh-keygen writes it, the public key as one
 * `ssh-ed25519 AAAA... comment` line), made in-process: about 1 ms, against a process spawn for ssh-keygen.
 * Node makes the key; the encoding is ours, because ssh2's generator strips leading zero bytes from the public
 * key and so writes an unreadable key about once in 256 (mscdex/ssh2#1390).
 */
export function newEd25519KeyPair(comment: string): { privateKey: string; publicKey: string } {
  const jwk = generateKeyPairSync('ed25519').privateKey.export({ format: 'jwk' });
  return openSshEd25519(Buffer.from(jwk.d!, 'base64url'), Buffer.from(jwk.x!, 'base64url'), comment);
}

/** Encodes an ed25519 key (32-byte seed and public key) as OpenSSH writes it: PROTOCOL.key, unencrypted. */
export function openSshEd25519(seed: Buffer, pub: Buffer, comment: string): { privateKey: string; publicKey: string } {
  if (seed.length !== 32 || pub.length !== 32) throw new Error('an ed25519 seed and public key are 32 bytes each');
  const blob = sshStrings('ssh-ed25519', pub);
  const check = randomBytes(4);
  const secret = Buffer.concat([check, check, sshStrings('ssh-ed25519', pub, Buffer.concat([seed, pub]), comment)]);
  const padding = Buffer.from(Array.from({ length: (8 - (secret.length % 8)) % 8 }, (_, i) => i + 1));
  const body = Buffer.concat([
    Buffer.from('openssh-key-v1\0'),
    sshStrings('none', 'none', ''),
    uint32(1),
    sshStrings(blob, Buffer.concat([secret, padding])),
  ]);
  const lines = body.toString('base64').match(/.{1,70}/g)!;
  const privateKey = ['-----BEGIN OPENSSH PRIVATE KEY-----', ...lines, '-----END OPENSSH PRIVATE KEY-----', ''].join('\n');
  return { privateKey, publicKey: `ssh-ed25519 ${blob.toString('base64')} ${comment}` };
}

function uint32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

/** SSH wire strings: each a uint32 length and its bytes. */
function sshStrings(...values: (string | Buffer)[]): Buffer {
  const fields = values.map((v) => (typeof v === 'string' ? Buffer.from(v) : v));
  return Buffer.concat(fields.flatMap((bytes) => [uint32(bytes.length), bytes]));
}

/** A fresh ed25519 SSH host key for one VM. */
export function generateHostKey(opts: { comment?: string } = {}): HostKey {
  return newEd25519KeyPair(opts.comment ?? 'banger-vm');
}

export interface ParsedPublicKey {
  type: string;
  /** The raw SSH wire-format key blob (what ssh2's hostVerifier receives). */
  blob: Buffer;
  comment?: string;
}

/** Parses one `type base64 [comment]` line (authorized_keys / .pub / known_hosts-without-host format). */
export function parsePublicKey(line: string): ParsedPublicKey {
  const parts = String(line).trim().split(/\s+/);
  const [type, b64, ...rest] = parts;
  const bad = (why: string) =>
    new BangerError('invalid_params', `not an SSH public key (${why}): ${JSON.stringify(String(line).slice(0, 60))}`);
  if (!type || !b64) throw bad('expected "<type> <base64>"');
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(b64)) throw bad('bad base64');
  const blob = Buffer.from(b64, 'base64');
  // The blob starts with the key type as an SSH string: uint32 length, then the name.
  if (blob.length < 4) throw bad('blob too short');
  const n = blob.readUInt32BE(0);
  if (n > blob.length - 4) throw bad('blob truncated');
  const inner = blob.subarray(4, 4 + n).toString('latin1');
  if (inner !== type) throw bad(`blob says ${inner}`);
  return { type, blob, comment: rest.length ? rest.join(' ') : undefined };
}
