/**
 * Who is process `pid`? Read from /proc, guarding against pid reuse (the caller says which command lines are
 * ours) and against the window in which a process is exiting: after SIGKILL or exit it loses its command line
 * before it becomes a zombie, and a zombie leader's other threads may still hold its files (sockets) open.
 * Such a process is 'unknown' (not gone yet, no longer identifiable); only a fully reaped or lone zombie is gone.
 */
import { readdir, readFile } from 'node:fs/promises';
import { errorMessage } from '../../errors.js';
import { errnoCode as errno } from './errno.js';

export type PidIdentity = 'gone' | 'ours' | 'other' | 'unknown';

/** `PF_EXITING` in the flags field of /proc/<pid>/stat (include/linux/sched.h): the task is exiting. */
const PF_EXITING = 0x4;

/** The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses). */
const statRest = (statText: string) => statText.slice(statText.lastIndexOf(')') + 2).split(' ');
const isZombie = (statText: string) => ['Z', 'X', 'x'].includes(statRest(statText)[0]);
const statFlags = (statText: string) => Number(statRest(statText)[6]) || 0;

async function otherThreadsLeft(pid: number): Promise<boolean> {
  try {
    return (await readdir(`/proc/${pid}/task`)).some((t) => t !== String(pid));
  } catch {
    return false;
  }
}

async function readProc(pid: number, file: string): Promise<string | { id: PidIdentity; detail?: string }> {
  try {
    return await readFile(`/proc/${pid}/${file}`, 'utf8');
  } catch (e) {
    if (errno(e) === 'ENOENT' || errno(e) === 'ESRCH') return { id: 'gone' };
    return { id: 'unknown', detail: errorMessage(e) };
  }
}

async function zombieVerdict(pid: number): Promise<{ id: PidIdentity; detail?: string }> {
  return (await otherThreadsLeft(pid)) ? { id: 'unknown', detail: 'exiting' } : { id: 'gone', detail: 'zombie' };
}

export async function identifyProcess(pid: number, isOurs: (argv: string[]) => boolean): Promise<{ id: PidIdentity; detail?: string }> {
  if (!Number.isInteger(pid) || pid <= 0) return { id: 'gone', detail: `invalid pid ${pid}` };
  let stat = await readProc(pid, 'stat');
  if (typeof stat !== 'string') return stat;
  if (isZombie(stat)) return zombieVerdict(pid);
  const cmdline = await readProc(pid, 'cmdline');
  if (typeof cmdline !== 'string') return cmdline;
  if (cmdline === '') {
    stat = await readProc(pid, 'stat');
    if (typeof stat !== 'string') return stat;
    if (isZombie(stat)) return zombieVerdict(pid);
    if (statFlags(stat) & PF_EXITING) return { id: 'unknown', detail: 'exiting' };
    return { id: 'other', detail: '(no command line)' };
  }
  const argv = cmdline.split('\0');
  if (argv[argv.length - 1] === '') argv.pop();
  return isOurs(argv) ? { id: 'ours' } : { id: 'other', detail: argv.filter(Boolean).slice(0, 3).join(' ') || '(no command line)' };
}
