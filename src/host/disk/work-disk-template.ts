/**
 * Work disks made from a template: the part of a work disk that is the same for every VM of an image, size and
 * user key (a lazily initialised ext4 with the work seed's files and authorized_keys in it) is made once with
 * createWorkDisk and kept in the image's directory; each VM's work disk is a copy-on-write clone of it
 * (cloneWorkDisk, as for the workspace cache). A create then costs one `cp` (reflink, else a sparse copy of the
 * template's allocated blocks: a few MB), instead of mkfs, a dump of the seed and a debugfs run writing all of it.
 * The VM's own files are on its identity disk; only a VM whose image has none gets its git identity written in
 * with debugfs.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BangerError } from '../../errors.js';
import { run, type Runner } from '../exec/runner.js';
import { createWorkDisk, readDiskFile, type CowStrategy, type WorkDiskOptions } from './disks.js';
import { cloneWorkDisk, type TemplateFacts } from './work-disk-clone.js';

export interface TemplateOptions {
  /** Where templates are kept (the image's directory: they go when the image goes). */
  templateDir: string;
  sizeBytes: number;
  seedImage: string;
  authorizedKeys: string;
  runner?: Runner;
  signal?: AbortSignal;
}

export interface WorkDiskTemplate {
  disk: string;
  facts: TemplateFacts;
}

const FORMAT = 2;

/** The template's file names: keyed by everything it holds (size, the seed as a file, the authorized key). */
async function templatePaths(opts: TemplateOptions): Promise<{ disk: string; facts: string }> {
  const seed = await stat(opts.seedImage).catch(() => undefined);
  if (!seed?.isFile()) throw new BangerError('not_found', `work seed ${opts.seedImage} does not exist`, 'pull or import the image again');
  const key = createHash('sha256')
    .update(JSON.stringify([FORMAT, opts.sizeBytes, opts.seedImage, seed.ino, seed.size, seed.mtimeMs, opts.authorizedKeys.trim()]))
    .digest('hex')
    .slice(0, 24);
  const base = join(opts.templateDir, `.work-template-${key}`);
  return { disk: `${base}.ext4`, facts: `${base}.json` };
}

/**
 * The template for these options, made on first use. Built under a unique temporary name and renamed into place
 * (its facts first), so a template that exists is complete; two creates racing both build, and one rename wins.
 */
export async function ensureWorkDiskTemplate(opts: TemplateOptions): Promise<WorkDiskTemplate> {
  const paths = await templatePaths(opts);
  const known = await readFacts(paths.facts);
  if (known && (await stat(paths.disk).then((s) => s.isFile(), () => false))) return { disk: paths.disk, facts: known };
  await mkdir(opts.templateDir, { recursive: true, mode: 0o700 });
  const tmp = `${paths.disk}.${process.pid}.${randomBytes(4).toString('hex')}.partial`;
  try {
    const ctx = { runner: opts.runner ?? run, signal: opts.signal };
    await createWorkDisk(tmp, { sizeBytes: opts.sizeBytes, seedImage: opts.seedImage, authorizedKeys: opts.authorizedKeys, ...ctx });
    const facts: TemplateFacts = { gitconfig: (await readDiskFile(tmp, '/.gitconfig', ctx)) ?? '' };
    await writeFile(`${paths.facts}.partial`, JSON.stringify(facts));
    await rename(`${paths.facts}.partial`, paths.facts);
    await rename(tmp, paths.disk);
    return { disk: paths.disk, facts };
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
}

async function readFacts(path: string): Promise<TemplateFacts | undefined> {
  try {
    const f = JSON.parse(await readFile(path, 'utf8')) as TemplateFacts;
    return typeof f.gitconfig === 'string' ? f : undefined;
  } catch {
    return undefined;
  }
}

/** A VM's work disk from the template: a clone, with the git identity written in when one is given. Refuses an existing `dst` like createWorkDisk. */
export async function workDiskFromTemplate(
  dst: string,
  opts: TemplateOptions & { gitIdentity?: WorkDiskOptions['gitIdentity'] },
): Promise<CowStrategy> {
  if (await stat(dst).then(() => true, () => false)) throw new BangerError('conflict', `work disk ${dst} already exists`, 'delete it first if you really want a fresh one');
  const template = await ensureWorkDiskTemplate(opts);
  return cloneWorkDisk(template.disk, dst, {
    gitIdentity: opts.gitIdentity,
    seedImage: opts.seedImage,
    known: template.facts,
    runner: opts.runner,
    signal: opts.signal,
  });
}
