/**
 * banger's ed25519 keys against the real ssh-keygen and ssh2's parser: every key reads back, including the one
 * key in 256 whose public half starts with a zero byte (ssh2's own generator wrote those unreadable).
 */
import { generateKeyPairSync } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import ssh2 from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureUserKey, newEd25519KeyPair, openSshEd25519 } from '../../src/host/guest/keys.js';

const { utils } = ssh2;
let dir: string;
beforeAll(async () => void (dir = await mkdtemp(join(tmpdir(), 'banger-keys-'))));
afterAll(() => rm(dir, { recursive: true, force: true }));

/** A key whose public half starts with 0x00: about one draw in 256. */
function leadingZeroKey(): { seed: Buffer; pub: Buffer } {
  for (;;) {
    const jwk = generateKeyPairSync('ed25519').privateKey.export({ format: 'jwk' });
    const pub = Buffer.from(jwk.x!, 'base64url');
    if (pub[0] === 0) return { seed: Buffer.from(jwk.d!, 'base64url'), pub };
  }
}

/** What ssh-keygen derives from the private key file: its public line. */
async function keygenPublic(privateKey: string): Promise<string> {
  const file = join(dir, `k-${Math.random().toString(36).slice(2)}`);
  await writeFile(file, privateKey, { mode: 0o600 });
  return (await execa('ssh-keygen', ['-y', '-f', file])).stdout.trim();
}

describe('ed25519 keys', () => {
  it('ssh-keygen reads a key whose public half starts with a zero byte and derives the same public line (comment included)', async () => {
    const { seed, pub } = leadingZeroKey();
    const pair = openSshEd25519(seed, pub, 'zero');
    expect(await keygenPublic(pair.privateKey)).toBe(pair.publicKey);
    expect(utils.parseKey(pair.privateKey)).not.toBeInstanceOf(Error);
    expect(utils.parseKey(pair.publicKey)).not.toBeInstanceOf(Error);
  });

  it('2000 fresh pairs all parse (the ssh2 generator breaks about one in 256: 5 of 2000 when measured)', () => {
    const bad = Array.from({ length: 2000 }, () => newEd25519KeyPair('banger')).filter(
      (p) => utils.parseKey(p.privateKey) instanceof Error || utils.parseKey(p.publicKey) instanceof Error,
    );
    expect(bad).toEqual([]);
  });

  it('a pair signs and verifies through ssh2, and ssh-keygen agrees on its public line', async () => {
    const pair = newEd25519KeyPair('banger-vm');
    const key = utils.parseKey(pair.privateKey) as ssh2.ParsedKey;
    const signature = key.sign(Buffer.from('data'));
    const pub = utils.parseKey(pair.publicKey) as ssh2.ParsedKey;
    expect(pub.verify(Buffer.from('data'), signature)).toBe(true);
    expect(await keygenPublic(pair.privateKey)).toBe(pair.publicKey);
  });

  it('the user key is made once, mode 0600, and its .pub matches what ssh-keygen derives', async () => {
    const keys = join(dir, 'keys');
    const first = await ensureUserKey(keys);
    const again = await ensureUserKey(keys);
    expect(again.publicKey).toBe(first.publicKey);
    expect((await stat(first.privateKeyPath)).mode & 0o777).toBe(0o600);
    const derived = (await execa('ssh-keygen', ['-y', '-f', first.privateKeyPath])).stdout.trim();
    expect(derived).toBe(first.publicKey);
  });

  it('an unreadable user key is refused with its path and the way out, and left as it was', async () => {
    const keys = join(dir, 'broken');
    await mkdir(keys, { recursive: true });
    await writeFile(join(keys, 'id_ed25519'), 'not a key\n', { mode: 0o600 });
    const error = await ensureUserKey(keys).catch((e: unknown) => e);
    expect(error).toMatchObject({ message: expect.stringContaining(join(keys, 'id_ed25519')), hint: expect.stringContaining('move it aside') });
    expect(await readFile(join(keys, 'id_ed25519'), 'utf8')).toBe('not a key\n');
  });
});
