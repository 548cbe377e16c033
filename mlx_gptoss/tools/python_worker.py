"""The python tool's two processes inside the sandbox (run as a script, never imported).

`supervisor` holds the request/reply channel to the caller (its stdin/stdout) and makes itself
non-dumpable, so code running as the same user cannot open its descriptors through /proc or
ptrace it. It starts `kernel`, the process that runs the model's code, with nothing but a code
pipe, a done pipe and the capture file: the caller's channel is not among its descriptors, and
the per-call nonce the supervisor echoes never reaches it. Whatever the kernel does (forged done
lines, dying, garbage) can only spoil its own result, which the supervisor reports as text.

Kernel: globals persist from call to call like a notebook's; the value of a final expression is
printed (Jupyter style). Output of the code and its children goes to one capture file
(O_APPEND), which the supervisor cuts to `max_output` characters.
"""
import ast
import codecs
import ctypes
import json
import os
import resource
import subprocess
import sys
import traceback

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36


def limit(kind: int, value: int) -> None:
    if value > 0:
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):  # macOS refuses some (RLIMIT_AS); Linux applies all
            if sys.platform.startswith("linux"):
                raise


def supervisor(memory: int, file_size: int, processes: int, cpu: int, prefix: list) -> None:
    """`prefix`: the command that wraps the kernel (macOS: sandbox-exec and its profile)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        # Orphans of the code re-parent here, so the caller finds them through /proc.
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the sandbox profile protects the channel
        pass
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    capture = os.open("/tmp" if os.path.isdir("/tmp") else ".", os.O_RDWR | os.O_TMPFILE, 0o600) \
        if hasattr(os, "O_TMPFILE") else None
    if capture is None:  # macOS: an unlinked file
        path = os.path.join(os.environ.get("TMPDIR", "."), f"capture-{os.getpid()}")
        capture = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.unlink(path)
    appending = os.open(f"/proc/self/fd/{capture}", os.O_WRONLY | os.O_APPEND) \
        if os.path.isdir("/proc/self/fd") else capture
    kernel = None
    sequence = 0

    def start():
        code_r, code_w = os.pipe()
        done_r, done_w = os.pipe()

        def limits():
            limit(resource.RLIMIT_AS, memory)
            limit(resource.RLIMIT_FSIZE, file_size)
            limit(resource.RLIMIT_NPROC, processes)
            limit(resource.RLIMIT_CPU, cpu)

        process = subprocess.Popen(
            [*prefix, sys.executable, "-I", os.path.abspath(__file__), "kernel", str(done_w)],
            stdin=code_r, stdout=appending, stderr=appending, pass_fds=(done_w,),
            preexec_fn=limits, close_fds=True)
        os.close(code_r)
        os.close(done_w)
        return process, os.fdopen(code_w, "w", encoding="utf-8"), os.fdopen(done_r, "r", encoding="utf-8")

    for line in requests:
        request = json.loads(line)
        reap_orphans(kernel[0].pid if kernel else None)
        if kernel is None or kernel[0].poll() is not None:
            kernel = start()
        process, code_pipe, done_pipe = kernel
        sequence += 1
        os.ftruncate(capture, 0)
        error, died = "", None
        try:
            code_pipe.write(json.dumps({"sequence": sequence, "code": request["code"]}) + "\n")
            code_pipe.flush()
            while True:
                done = done_pipe.readline()
                if not done:
                    died = process.wait()
                    break
                try:  # the code can write into the done pipe too: skip what is not ours
                    done = json.loads(done)
                    if done.get("sequence") == sequence:
                        error = str(done.get("error", ""))
                        break
                except (ValueError, AttributeError):
                    continue
        except OSError:  # a broken pipe
            process.kill()
            died = process.wait()
        if died is not None:
            kernel = None
        cut = request["max_output"]
        reply = {"nonce": request["nonce"], "output": read_back(capture, cut),
                 "error": [error[:cut], len(error)], "died": died}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def reap_orphans(keep: int | None) -> None:
    """As the sandbox's init, collect exited orphans of the code (they count as processes),
    leaving the kernel's exit status for its Popen."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except (ChildProcessError, AttributeError):  # no children; no waitid (macOS)
            return
        if info is None or info.si_pid == keep:
            return
        os.waitpid(info.si_pid, 0)


def read_back(fd: int, limit_chars: int) -> list:
    """[the first `limit_chars` characters of the captured output, its total length]."""
    os.lseek(fd, 0, os.SEEK_SET)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    head, total = [], 0
    while True:
        chunk = os.read(fd, 1 << 20)
        text = decoder.decode(chunk, final=not chunk)
        head.append(text[:max(limit_chars - total, 0)])
        total += len(text)
        if not chunk:
            return ["".join(head), total]


def kernel(done_fd: int) -> None:
    done = os.fdopen(done_fd, "w", encoding="utf-8")
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    null_out = os.open(os.devnull, os.O_WRONLY)
    output = os.dup(1)
    namespace = {"__name__": "__main__"}
    for line in requests:
        try:  # the code can write into its own request pipe (through /proc/self/fd)
            request = json.loads(line)
            code, sequence = request["code"], request["sequence"]
        except (ValueError, TypeError, KeyError):
            continue
        error = run(code, namespace)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException as e:  # e.g. the file-size limit
                error = error or "".join(traceback.format_exception_only(type(e), e))
        # Flushing into /dev/null drops what a failed flush left buffered, out of the next
        # call's output.
        os.dup2(null_out, 1)
        os.dup2(null_out, 2)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os.dup2(output, 1)
        os.dup2(output, 2)
        done.write(json.dumps({"sequence": sequence, "error": error}) + "\n")
        done.flush()


def run(code: str, namespace: dict) -> str:
    """The traceback of what the code raised, or ""."""
    try:
        tree = ast.parse(code, "<python>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<python>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<python>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    except BaseException:
        kind, error, tb = sys.exc_info()
        while tb is not None and tb.tb_frame.f_code.co_filename != "<python>":
            tb = tb.tb_next
        return "".join(traceback.format_exception(kind, error, tb))
    return ""


if __name__ == "__main__":
    if sys.argv[1] == "supervisor":
        supervisor(*map(int, sys.argv[2:6]), json.loads(sys.argv[6]))
    else:
        kernel(int(sys.argv[2]))
