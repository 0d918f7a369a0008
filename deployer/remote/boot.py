"""The two strings that start the agent on a board: `LAUNCH` runs a stored bundle, `BOOTSTRAP` receives one.

Both run as `python3 -c STRING ...` (docs/design.md, section 1), so they stay small and 3.6-safe. The
controller puts them on the remote command line; the agent uses `LAUNCH` again to start its OpenCL child.
"""

# `python3 -c LAUNCH ROOT MODULE ARGS..`: put ROOT (a bundle folder) first on sys.path and import MODULE
# rather than run a script, so Python keeps every module's bytecode in the bundle's __pycache__ and no
# session (nor OpenCL child) compiles the agent again (~40 ms here, several times that on a board). A full
# disk can leave a truncated .pyc behind (a short write Python does not check): the import then fails, every
# __pycache__ of the package is dropped, and the agent is imported again without writing bytecode.
LAUNCH = """import sys,os,shutil,importlib as I;p,n=sys.argv[1:3];sys.path[:0]=[p];t=n.split('.')[0]
try:m=I.import_module(n)
except Exception:
 for d,s,f in list(os.walk(os.path.join(p,t))):d.endswith('__pycache__')and shutil.rmtree(d,1)
 [sys.modules.pop(k)for k in list(sys.modules)if k.split('.')[0]==t];sys.dont_write_bytecode=1;m=I.import_module(n)
sys.exit(m.main(sys.argv[2:]))"""

# `python3 -c BOOTSTRAP RD ID12`, run only when RD/agent/ID12 is missing: ask for the bundle, check each
# path and the identity (bundle.bundle_id: sha256 over the sorted (path, size, bytes)), unpack it into a temp
# folder, fsync, rename the folder to RD/agent/ID12 in one step (a killed bootstrap leaves no half bundle
# under that name), then run it with LAUNCH. Under `push --check` it unpacks into a temp folder instead.
BOOTSTRAP = r'''import hashlib, json, os, re, shutil, sys
rd, want = sys.argv[1], sys.argv[2]
out, inp = sys.stdout.buffer, sys.stdin.buffer


def say(obj):
    out.write((json.dumps(obj) + "\n").encode()); out.flush()


def fail(kind, msg):
    say({"ok": False, "error": {"kind": kind, "message": "bootstrap: " + msg}}); sys.exit(1)


def fsync(path, flags=os.O_RDONLY):
    fd = os.open(path, flags)
    try: os.fsync(fd)
    finally: os.close(fd)
if not re.match(r"[0-9a-f]{12}\Z", want):
    fail("bad_request", "bad agent id %r" % want)
out.write(b'{"op":"need_agent"}\n'); out.flush()
try:
    msg = json.loads(inp.readline(1 << 20).decode("utf-8")); n = int(msg["payload_size"])
    files = [(str(p), int(s)) for p, s in msg["files"]]
except Exception as e: fail("bad_request", "expected the agent message: %s" % e)
if not 0 < len(files) <= 256 or sum(s for _, s in files) != n or n > 64 << 20 or files != sorted(set(files)):
    fail("bad_request", "bad bundle index")
data = bytearray()
while len(data) < n:
    chunk = inp.read(n - len(data))
    if not chunk: fail("bad_request", "input ended after %d of %d agent bytes" % (len(data), n))
    data += chunk
digest, parts, pos = hashlib.sha256(), [], 0
for path, size in files:
    if not re.match(r"deployer_remote/[a-z_][a-z0-9_]*\.py\Z", path) or size < 0:
        fail("bad_request", "bad bundle path %r" % path)
    digest.update(("%s\0%d\0" % (path, size)).encode()); digest.update(data[pos:pos + size])
    parts.append((path, data[pos:pos + size])); pos += size
got = digest.hexdigest()
if got != msg.get("sha256") or got[:12] != want:
    fail("checksum", "agent sha256 %s, expected %s (%s...)" % (got, msg.get("sha256"), want))
base = os.path.join(rd, "agent")
if os.environ.get("DEPLOYER_CHECK"):  # --check writes nothing in RD: the bundle lives in a temp folder
    import tempfile; root = tmp = tempfile.mkdtemp(prefix="deployer-check-")
else:
    root, tmp = os.path.join(base, want), os.path.join(base, ".tmp-%s-%d" % (want, os.getpid()))
try:
    os.makedirs(os.path.join(tmp, "deployer_remote"), 0o755)
    for path, body in parts:
        with open(os.path.join(tmp, path), "wb") as f: f.write(body); f.flush(); os.fsync(f.fileno())
    fsync(os.path.join(tmp, "deployer_remote")); fsync(tmp)
    if tmp != root:
        try: os.rename(tmp, root)
        except OSError:
            if not os.path.isdir(os.path.join(root, "deployer_remote")): raise
            shutil.rmtree(tmp, True)  # another controller stored the same bundle first
        fsync(base)
except OSError as e:
    shutil.rmtree(tmp, True); fail("io", "cannot store the agent at %s: %s" % (root, e))
os.execv(sys.executable, [sys.executable, "-c", LAUNCH, root, "deployer_remote.main", "serve", rd])
'''.replace("LAUNCH, root", repr(LAUNCH) + ", root")
