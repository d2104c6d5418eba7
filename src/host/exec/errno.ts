/** The errno code of a failed system call (`ENOENT`, `EACCES`, ...), or undefined for any other value. */
export function errnoCode(e: unknown): string | undefined {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}
