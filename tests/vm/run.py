#!/usr/bin/env python3
"""Run selected kernel tests inside a QEMU VM that boots a stock Debian kernel.

Why: this machine's kernel has no ip_vs, no 802.1Q VLANs and no modules at all; Debian's stock
kernel has both. So the harness boots that kernel under QEMU and runs one pytest session inside it,
against this machine's own filesystem (its Python, venv, ip, nft, curl, dig and this work tree).

    tests/vm/run.py [OPTIONS] [--] PYTEST_ARGS...     run PYTEST_ARGS inside the VM, exit with pytest's code
    tests/vm/run.py --build-only                     just build (or find) the cached boot assets
    tests/vm/run.py --need-vm                        exit 0 if this host kernel lacks 8021q or ip_vs
    tests/vm/run.py --guest-cmd 'CMD'                run a shell command instead of pytest (debugging, timing)
    tests/vm/run.py --guest-setup 'CMD' -- ARGS...   run CMD in the guest first (e.g. try a patch: it
                                                     lands in the guest's overlay, never in this tree)

e.g. tests/vm/run.py tests/kernel/test_modes.py -k vlan

How (all stdlib; needs qemu-system-x86, busybox-static, kmod, ipvsadm: `make vm-assets` installs them):

1. Boot assets, built once and cached, keyed by the kernel package and its version, in
   $MESH_VM_CACHE, else $XDG_CACHE_HOME/mesh-vm, else /var/cache/mesh-vm (root) or ~/.cache/mesh-vm:
   `<pkg>_<version>/pkg/` the kernel package (`apt-get download` + `dpkg -x`, never installed, so
   this machine's boot is untouched; hardware-only module folders pruned; `depmod -b` run on it),
   `vmlinux` (the ELF payload decompressed out of the bzImage, as the kernel's extract-vmlinux does:
   it boots through PVH and saves seconds of in-guest decompression), and `initramfs-<hash>.cpio`
   (busybox-static, the virtio/9p/overlay modules and the two init scripts below; the hash covers
   their content, so editing this file rebuilds it). The package is linux-image-amd64's current
   dependency unless MESH_VM_KERNEL_PKG names one; offline, the newest cached kernel is used.
2. QEMU (TCG by default: the /dev/kvm here only runs specially built guests; MESH_VM_ACCEL=kvm where
   KVM works) boots it with four virtio-9p shares: this machine's `/` read-only, the kernel's
   modules read-only, a fresh results folder read-write, and this work tree read-only (mounted with
   a tmpfs overlay at its own path when the guest cannot see it, e.g. a CI clone under /tmp).
3. Stage 1 (/init in the initramfs) loads the 9p and overlay modules, mounts `/` with a tmpfs
   overlay on top (the guest may write anywhere: /etc/netns, /run/mesh, __pycache__; nothing reaches
   this machine), mounts the modules at /lib/modules/<ver> and the results at /run/mesh-vm/results,
   hides /mnt, and switch_roots. Stage 2 mounts /dev/pts, /dev/shm, /tmp, brings `lo` up and runs
   the job this script wrote into the results folder: modprobe the modules mesh uses (failures of
   built-ins are harmless), the self-check tests/vm/test_guest_kernel.py (8021q and ip_vs usable; if it
   fails the selection is not run, so no test can quietly take a no-VLAN fallback path), then
   `cd <repo> && PYTHONSAFEPATH=1 .venv/bin/python -m pytest -q <selection> --junitxml=... -p
   no:cacheprovider`. It writes the exit codes into the results folder and powers off.
4. This script streams the guest console, enforces a wall-clock limit (--timeout, MESH_VM_TIMEOUT,
   default 600 s: QEMU is killed by its PID and the run fails with exit 124), always kills QEMU on
   the way out (and QEMU dies with this process: PR_SET_PDEATHSIG), prints a summary of the JUnit
   XML, copies it to --junitxml if given, keeps the console log on failure (or with --keep-log) and
   exits with pytest's exit code; 125 when the guest never reported one.

Emulated Python is 20-60x slower than native: one VM per run, one pytest session inside it.
"""
from __future__ import annotations

import argparse
import bz2
import ctypes
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SELF_CHECK = "tests/vm/test_guest_kernel.py"
DEFAULT_SELECTION = "tests/kernel/test_modes.py::test_macvlan_on_a_vlan_sub_interface_made_on_demand"

# Modules for the initramfs (their dependencies come along from modules.dep).
BOOT_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
# Modules loaded in the guest before the tests: everything mesh (and mesh.lb) makes or uses.
GUEST_MODULES = [
    "8021q", "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "macvlan", "veth", "bridge", "vxlan", "dummy",
    "nf_tables", "nf_conntrack", "nf_nat", "nft_nat", "nft_chain_nat", "nft_ct", "nft_masq", "nft_numgen",
    "nft_fib", "nft_fib_ipv4", "nft_fib_inet", "nft_limit", "nft_log", "nf_log_syslog", "nft_reject",
    "nft_reject_inet", "nft_redir", "nft_hash",
]
# Module folders of hardware a VM never has: dropped from the cached package to keep it small.
PRUNE = ["drivers/gpu", "drivers/media", "sound", "drivers/net/wireless", "drivers/net/ethernet",
         "drivers/net/can", "drivers/net/usb", "drivers/net/wwan", "drivers/infiniband", "drivers/staging",
         "drivers/scsi", "drivers/usb", "drivers/iio", "drivers/hid", "drivers/input", "drivers/hwmon",
         "drivers/bluetooth", "net/bluetooth", "net/mac80211", "net/wireless", "drivers/isdn"]
QEMU = "qemu-system-x86_64"
MARK = "@@mesh-vm"
EXIT_TIMEOUT, EXIT_NO_RESULT = 124, 125
MSIZE = 512000  # the largest the 9p virtio transport takes on 6.1


def log(msg: str) -> None:
    print(f"mesh-vm: {msg}", file=sys.stderr, flush=True)


class HarnessError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# the cache of boot assets

def cache_root() -> Path:
    if os.environ.get("MESH_VM_CACHE"):
        return Path(os.environ["MESH_VM_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mesh-vm"
    if os.geteuid() == 0:
        return Path("/var/cache/mesh-vm")
    return Path.home() / ".cache" / "mesh-vm"


def _out(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def resolve_kernel_package() -> tuple[str, str] | None:
    """(package, version) of the kernel to boot, from apt's lists; None when apt cannot say."""
    try:
        pkg = os.environ.get("MESH_VM_KERNEL_PKG")
        if not pkg:
            deps = re.findall(r"Depends: (linux-image-\S+)", _out(["apt-cache", "depends", "linux-image-amd64"]))
            if not deps:
                return None
            pkg = deps[0]
        version = re.search(r"Candidate: (\S+)", _out(["apt-cache", "policy", pkg]))
        if not version or version.group(1) == "(none)":
            return None
        return pkg, version.group(1)
    except (HarnessError, FileNotFoundError):
        return None


class Assets:
    """One cached kernel: <cache>/<pkg>_<version>/{pkg/, vmlinux or bzImage, initramfs-*.cpio, ready}."""

    def __init__(self, folder: Path):
        self.folder = folder
        info = json.loads((folder / "ready").read_text())
        self.kver: str = info["kver"]
        self.kernel = folder / info["kernel"]
        self.modules = folder / "pkg" / "lib" / "modules" / self.kver

    def initramfs(self) -> Path:
        init, stage2 = STAGE1.replace("@KVER@", self.kver), STAGE2
        busybox = Path(shutil.which("busybox") or "/bin/busybox")
        key = hashlib.sha256((init + stage2 + ",".join(BOOT_MODULES)).encode()
                             + hashlib.sha256(busybox.read_bytes()).digest()).hexdigest()[:12]
        path = self.folder / f"initramfs-{key}.cpio"
        if not path.exists():
            build_initramfs(path, self.modules, init, stage2, busybox)
            for old in self.folder.glob("initramfs-*.cpio"):
                if old != path:
                    old.unlink()
        return path


def ensure_assets() -> Assets:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wanted = resolve_kernel_package()
        if wanted is None:
            cached = sorted((p for p in root.iterdir() if (p / "ready").exists()),
                            key=lambda p: (p / "ready").stat().st_mtime)
            if not cached:
                raise HarnessError("apt cannot name a kernel package (run apt-get update, or set "
                                   "MESH_VM_KERNEL_PKG) and none is cached in " + str(root))
            log(f"apt cannot name a kernel package; using the cached {cached[-1].name}")
            folder = cached[-1]
        else:
            pkg, version = wanted
            folder = root / f"{pkg}_{version}"
            if not (folder / "ready").exists():
                build_kernel(folder, pkg, version)
        assets = Assets(folder)
        assets.initramfs()
        return assets


def build_kernel(folder: Path, pkg: str, version: str) -> None:
    t0 = time.monotonic()
    log(f"building boot assets for {pkg} {version} in {folder}")
    work = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    os.chmod(work, 0o755)
    try:
        download = work / "deb"
        download.mkdir()
        os.chmod(download, 0o777)  # apt drops to _apt to download
        for attempt in (1, 2):
            proc = subprocess.run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=download,
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                break
            if attempt == 1:
                log("apt-get download failed; running apt-get update once")
                subprocess.run(["apt-get", "update", "-qq"], check=False)
        else:
            raise HarnessError(f"apt-get download {pkg}={version}: {proc.stderr.strip()}")
        deb = next(download.glob("*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(work / "pkg")], check=True)
        shutil.rmtree(download)
        moddirs = sorted((work / "pkg" / "lib" / "modules").iterdir())
        if len(moddirs) != 1:
            raise HarnessError(f"expected one module folder in {pkg}, found {[p.name for p in moddirs]}")
        kver = moddirs[0].name
        for sub in PRUNE:
            shutil.rmtree(moddirs[0] / "kernel" / sub, ignore_errors=True)
        depmod = shutil.which("depmod") or "/sbin/depmod"
        subprocess.run([depmod, "-b", str(work / "pkg"), kver], check=True)
        bzimage = work / "pkg" / "boot" / f"vmlinuz-{kver}"
        kernel = "bzImage"
        try:
            elf = extract_vmlinux(bzimage.read_bytes())
            if has_pvh_note(elf):
                (work / "vmlinux").write_bytes(elf)
                kernel = "vmlinux"
            else:
                log("the uncompressed kernel has no PVH entry note: booting the bzImage")
        except HarnessError as exc:
            log(f"{exc}: booting the bzImage")
        shutil.move(str(bzimage), str(work / "bzImage"))
        (work / "ready").write_text(json.dumps({"package": pkg, "version": version, "kver": kver,
                                                "kernel": kernel, "built": time.time()}))
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
        for old in folder.parent.iterdir():  # kernels apt no longer names: a point release replaced them
            if old != folder and old.is_dir() and (old / "ready").exists():
                log(f"removing the superseded {old.name} from the cache")
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"boot assets ready in {time.monotonic() - t0:.1f} s")


def extract_vmlinux(image: bytes) -> bytes:
    """The kernel's scripts/extract-vmlinux: find a compressed payload that decompresses to ELF."""
    def unxz(data: bytes) -> bytes:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)

    def ungzip(data: bytes) -> bytes:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)

    def unbz2(data: bytes) -> bytes:
        return bz2.BZ2Decompressor().decompress(data)

    def unlzma(data: bytes) -> bytes:
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)

    def unzstd(data: bytes) -> bytes:
        if not shutil.which("zstd"):
            raise ValueError("zstd is not installed")
        return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True).stdout

    for magic, decompress in ((b"\xfd7zXZ\x00", unxz), (b"\x28\xb5\x2f\xfd", unzstd),
                              (b"\x1f\x8b\x08", ungzip), (b"BZh", unbz2), (b"\x5d\x00\x00\x00", unlzma)):
        start = 0
        while (at := image.find(magic, start)) >= 0:
            start = at + 1
            try:
                out = decompress(image[at:])
            except (lzma.LZMAError, zlib.error, OSError, ValueError, EOFError):
                continue
            if out[:4] == b"\x7fELF":
                return out
    raise HarnessError("no compressed ELF payload found in the bzImage")


def has_pvh_note(elf: bytes) -> bool:
    """True when the ELF carries XEN_ELFNOTE_PHYS32_ENTRY (18), which QEMU's -kernel boots by PVH."""
    if elf[4] != 2:  # ELFCLASS64 only
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def is_static(elf: bytes) -> bool:
    """True for an ELF executable without a PT_INTERP (program interpreter) header."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return all(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def module_closure(moddir: Path, names: list[str]) -> list[Path]:
    """Module files to insmod, dependencies first; built-in names are skipped."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[_modname(path)] = (path, [_modname(d) for d in rest.split()])
    builtin = {_modname(l) for l in (moddir / "modules.builtin").read_text().split()}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in deps:
            if name in builtin:
                return
            raise HarnessError(f"module {name} is neither in modules.dep nor built in")
        path, needs = deps[name]
        for dep in needs:
            visit(dep)
        order.append(moddir / path)

    for name in names:
        visit(name)
    return order


def _modname(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


class Cpio:
    """A newc archive, as the kernel unpacks an initramfs."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.buf += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.buf += b"\0" * (-len(self.buf) % 4) + data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def dir(self, name: str) -> None:
        self.add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(name, stat.S_IFREG | perm, data)

    def bytes(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return bytes(self.buf)


def build_initramfs(path: Path, moddir: Path, init: str, stage2: str, busybox: Path) -> None:
    if not busybox.exists():
        raise HarnessError("busybox is missing: apt-get install busybox-static (make vm-assets)")
    if not is_static(busybox.read_bytes()):
        raise HarnessError(f"{busybox} is dynamically linked: apt-get install busybox-static")
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot"):
        cpio.dir(d)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    order = []
    for mod in module_closure(moddir, BOOT_MODULES):
        data = mod.read_bytes()
        if mod.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif mod.name.endswith(".gz"):
            data = gzip.decompress(data)
        elif mod.name.endswith(".zst"):
            data = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=True).stdout
        name = _modname(mod.name) + ".ko"
        cpio.file(f"modules/{name}", data)
        order.append(name)
    cpio.file("modules/order", ("\n".join(order) + "\n").encode())
    cpio.file("init", init.encode(), 0o755)
    cpio.file("stage2", stage2.encode(), 0o755)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(cpio.bytes())
    tmp.rename(path)
    log(f"built {path.name} ({path.stat().st_size // 1024} KiB: busybox and {', '.join(order)})")


STAGE1 = r"""#!/bin/busybox sh
# stage 1, PID 1 in the initramfs: mount this machine's / (9p, read-only) under a tmpfs overlay.
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "@@mesh-vm stage1 failed: $*"; poweroff -f; sleep 10; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
while read -r m; do insmod "/modules/$m" || fail "insmod $m"; done < /modules/order
ninep() {  # tag, where, options: the virtio device may still be probing, so retry for a while
  n=0
  until mount -t 9p -o "trans=virtio,version=9p2000.L,msize=@MSIZE@,$3" "$1" "$2" 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 50 ] && fail "mount 9p $1"; sleep 0.1
  done
}
ninep hostroot /lower ro,cache=loose
mount -t tmpfs -o mode=0755 tmpfs /rw && mkdir -p /rw/upper /rw/work || fail "tmpfs"
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
mkdir -p /newroot/run/mesh-vm/results
ninep results /newroot/run/mesh-vm/results cache=none
moddir=/newroot/lib/modules
[ -L /newroot/lib ] && moddir=/newroot/usr/lib/modules
mkdir -p "$moddir/@KVER@"
ninep kmods "$moddir/@KVER@" ro,cache=loose
mount -t tmpfs -o mode=0755 tmpfs /newroot/mnt  # nothing of this machine's /mnt in the guest
cp /bin/busybox /stage2 /newroot/run/mesh-vm/
mount --move /dev /newroot/dev && mount --move /proc /newroot/proc && mount --move /sys /newroot/sys
exec switch_root /newroot /run/mesh-vm/busybox sh /run/mesh-vm/stage2
""".replace("@MSIZE@", str(MSIZE))

STAGE2 = r"""# stage 2, PID 1 in the overlay root: a few mounts, then the job the harness wrote; power off.
BB=/run/mesh-vm/busybox
R=/run/mesh-vm/results
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
$BB mkdir -p /dev/pts /dev/shm
$BB mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$BB mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
$BB mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
$BB ln -sf /proc/self/fd /dev/fd
$BB ln -sf /proc/self/fd/0 /dev/stdin
$BB ln -sf /proc/self/fd/1 /dev/stdout
$BB ln -sf /proc/self/fd/2 /dev/stderr
$BB hostname mesh-vm
ip link set lo up
echo "@@mesh-vm guest-ready uptime=$($BB cut -d' ' -f1 /proc/uptime)"
/bin/sh $R/job.sh
echo $? > $R/exit-code.tmp && $BB mv $R/exit-code.tmp $R/exit-code
echo "@@mesh-vm done uptime=$($BB cut -d' ' -f1 /proc/uptime)"
$BB sync
$BB umount $R
$BB poweroff -f
"""


def job_script(assets: Assets, results: str, pytest_args: list[str] | None, guest_cmd: str | None,
               self_check: bool, setup: str | None = None, verbose_self_check: bool = True) -> str:
    q = shlex.quote
    lines = [
        "# written by tests/vm/run.py for one run",
        f"export R={q(results)}",
        f"export MESH_VM_GUEST=1 MESH_VM_KVER={q(assets.kver)} PYTHONSAFEPATH=1 PY_COLORS=0 HOME=/root LANG=C.UTF-8",
        "for m in " + " ".join(GUEST_MODULES) + "; do",
        "  modprobe -q \"$m\" || echo \"mesh-vm: modprobe $m failed\"",
        "done",
        f"echo \"{MARK} modules-loaded uptime=$(cut -d' ' -f1 /proc/uptime)\"",
        # the guest's /tmp and /mnt are fresh tmpfs: a work tree under them (a CI clone in /tmp) comes
        # in through its own 9p share, with a tmpfs overlay so the tests may write in it
        f"if [ ! -d {q(str(REPO / '.venv'))} ]; then",
        "  mkdir -p /run/mesh-vm/repo-ro /run/mesh-vm/repo-rw",
        f"  mount -t 9p -o trans=virtio,version=9p2000.L,msize={MSIZE},ro repo /run/mesh-vm/repo-ro || exit 2",
        "  mount -t tmpfs tmpfs /run/mesh-vm/repo-rw && mkdir -p /run/mesh-vm/repo-rw/u /run/mesh-vm/repo-rw/w",
        f"  mkdir -p {q(str(REPO))}",
        "  mount -t overlay overlay -o lowerdir=/run/mesh-vm/repo-ro,upperdir=/run/mesh-vm/repo-rw/u,"
        f"workdir=/run/mesh-vm/repo-rw/w {q(str(REPO))} || exit 2",
        "fi",
        f"cd {q(str(REPO))} || exit 2",
    ]
    if setup:
        lines += ["# --guest-setup: runs in this shell (its exports apply); writes land in the overlay only",
                  setup, f"echo \"{MARK} setup-done rc=$? uptime=$(cut -d' ' -f1 /proc/uptime)\""]
    if guest_cmd is not None:
        lines.append(guest_cmd)
        return "\n".join(lines) + "\n"
    py = ".venv/bin/python -m pytest -p no:cacheprovider"
    if self_check:
        lines += [
            f"{py} {'-v -rs' if verbose_self_check else '-q'} {SELF_CHECK} --junitxml=$R/selfcheck.xml",
            "rc=$?; echo $rc > $R/selfcheck-exit-code",
            f"echo \"{MARK} self-check-done rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)\"",
            "[ $rc -eq 0 ] || exit $rc",
        ]
    lines.append(f"{py} -q {' '.join(q(a) for a in pytest_args or [])} --junitxml=$R/junit.xml")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# booting

def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def qemu_argv(assets: Assets, initramfs: Path, results: Path, accel: str, memory: str, smp: int) -> list[str]:
    if accel == "kvm":
        machine = ["-accel", "kvm", "-cpu", "host"]
    else:
        machine = ["-accel", "tcg,tb-size=1024,thread=multi", "-cpu", "max"]
    shares = [("hostroot", "/", ",readonly=on,multidevs=remap"),
              ("kmods", str(assets.modules), ",readonly=on"),
              ("results", str(results), ""),
              ("repo", str(REPO), ",readonly=on,multidevs=remap")]
    argv = [QEMU, "-M", "pc", *machine, "-smp", str(smp), "-m", memory, "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            "-kernel", str(assets.kernel), "-initrd", str(initramfs),
            "-append", "console=ttyS0 quiet panic=-1 tsc=reliable random.trust_cpu=on"]
    for i, (tag, path, extra) in enumerate(shares):
        argv += ["-fsdev", f"local,id=fs{i},path={path},security_model=none{extra}",
                 "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag={tag}"]
    return argv


class Console(threading.Thread):
    """Copies the guest console to a log file (and to stdout), noting when the marker lines arrive."""

    def __init__(self, stream, logfile: Path, echo: bool, t0: float):
        super().__init__(daemon=True)
        self.stream, self.logfile, self.echo, self.t0 = stream, logfile, echo, t0
        self.marks: dict[str, float] = {}

    def run(self) -> None:
        with open(self.logfile, "wb") as out:
            for raw in iter(self.stream.readline, b""):
                out.write(raw)
                out.flush()
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.startswith(MARK):
                    word = line.split()[1] if len(line.split()) > 1 else "?"
                    self.marks.setdefault(word, time.monotonic() - self.t0)
                if self.echo:
                    try:
                        print(line, flush=True)
                    except (OSError, ValueError):  # our stdout went away: keep draining QEMU's
                        self.echo = False


def boot(assets: Assets, results: Path, args) -> tuple[int | None, Console, float, bool]:
    """Boot, run the job, return (guest exit code or None, console, seconds, timed out)."""
    initramfs = assets.initramfs()
    argv = qemu_argv(assets, initramfs, results, args.accel, args.memory, args.smp)
    if not shutil.which(QEMU):
        raise HarnessError(f"{QEMU} is missing: apt-get install qemu-system-x86 (make vm-assets)")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)
    console = Console(proc.stdout, results / "console.log", not args.quiet, t0)
    console.start()
    log(f"booted QEMU (pid {proc.pid}, {args.accel}) with {assets.folder.name}, limit {args.timeout:.0f} s")
    try:
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            log(f"TIMEOUT: the VM ran longer than {args.timeout:.0f} s; killing QEMU (pid {proc.pid})")
            proc.kill()
            proc.wait()
            console.join(5)
            return None, console, time.monotonic() - t0, True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    console.join(5)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        log(f"QEMU exited {proc.returncode}")
    code = results / "exit-code"
    return (int(code.read_text()) if code.exists() else None), console, elapsed, False


# ---------------------------------------------------------------------------------------------------
# results

def junit_summary(path: Path) -> tuple[dict[str, int], list[str]]:
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    notes = []
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                first = ((child.get("message") or "").splitlines() or [""])[0]
                notes.append(f"  {outcome.upper()} {name}: {first[:300]}")
                break
        counts[outcome] += 1
    return counts, notes


def report(results: Path, xml: str, label: str) -> bool:
    path = results / xml
    if not path.exists():
        return False
    counts, notes = junit_summary(path)
    log(f"{label}: {counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped ({path})")
    for note in notes:
        print(note, file=sys.stderr)
    return True


def main(argv: list[str]) -> int:
    if "--" in argv:
        at = argv.index("--")
        own, pytest_args = argv[:at], argv[at + 1:]
    else:
        own, pytest_args = argv, None
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--build-only", action="store_true", help="build or find the cached boot assets, then stop")
    parser.add_argument("--need-vm", action="store_true",
                        help="exit 0 when this host kernel lacks 8021q or ip_vs (so the VM is needed), else 1")
    parser.add_argument("--guest-cmd", help="run this shell command in the guest instead of pytest")
    parser.add_argument("--guest-setup", metavar="CMD",
                        help="shell command run in the guest before the tests, in the repo, in the job's shell; "
                             "what it writes stays in the guest's tmpfs overlay (try a patch, set a variable)")
    parser.add_argument("--no-self-check", dest="self_check", action="store_false",
                        help=f"do not run {SELF_CHECK} before the selection")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("MESH_VM_TIMEOUT", 600)),
                        help="wall-clock limit for the VM in seconds (MESH_VM_TIMEOUT, default 600)")
    parser.add_argument("--junitxml", help="also copy the JUnit XML of the selection here")
    parser.add_argument("--keep-log", action="store_true", help="keep the console log on success too")
    parser.add_argument("--quiet", action="store_true", help="do not echo the guest console")
    parser.add_argument("--accel", default=os.environ.get("MESH_VM_ACCEL", "tcg"), choices=["tcg", "kvm"])
    parser.add_argument("--memory", default=os.environ.get("MESH_VM_MEMORY", "1536M"))
    parser.add_argument("--smp", type=int, default=int(os.environ.get("MESH_VM_SMP", 2)))
    if pytest_args is None:
        args, pytest_args = parser.parse_known_args(own)
    else:
        args = parser.parse_args(own)

    if args.need_vm:
        sys.path.insert(0, str(HERE))
        import kernelcheck
        try:
            problems = kernelcheck.problems()
        except Exception as exc:  # cannot tell: say the VM is needed rather than skip its tests
            problems = [f"cannot probe this kernel ({exc!r})"]
        for p in problems:
            log(p)
        return 0 if problems else 1

    def on_term(signum, _frame):  # unwind, so that QEMU and half-built assets are cleaned up
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    t_start = time.monotonic()
    try:
        assets = ensure_assets()
    except (HarnessError, subprocess.CalledProcessError) as exc:
        log(f"cannot build the boot assets: {exc}")
        return EXIT_NO_RESULT
    if args.build_only:
        size = sum(f.stat().st_size for f in assets.folder.rglob("*") if f.is_file() and not f.is_symlink())
        log(f"assets for {assets.kver} in {assets.folder} ({size / 2**20:.0f} MiB)")
        return 0
    if args.guest_cmd is None and not (REPO / ".venv" / "bin" / "python").exists():
        log(f"{REPO / '.venv'} is missing: make venv")
        return EXIT_NO_RESULT
    if args.guest_cmd is None and not pytest_args:
        pytest_args = [DEFAULT_SELECTION]

    results = Path(tempfile.mkdtemp(prefix="mesh-vm-", dir=os.environ.get("TMPDIR", "/tmp")))
    (results / "job.sh").write_text(job_script(assets, "/run/mesh-vm/results", pytest_args, args.guest_cmd,
                                               args.self_check, args.guest_setup))
    what = args.guest_cmd if args.guest_cmd is not None else "pytest " + " ".join(pytest_args)
    log(f"guest job: {what}; results in {results}")

    try:
        code, console, elapsed, timed_out = boot(assets, results, args)
    except HarnessError as exc:
        log(str(exc))
        return EXIT_NO_RESULT
    marks = console.marks
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(marks.items(), key=lambda kv: kv[1]))
    log(f"VM wall time {elapsed:.1f} s ({steps}); whole run {time.monotonic() - t_start:.1f} s")

    if timed_out:
        log(f"FAILED: timed out after {args.timeout:.0f} s; console log kept: {results / 'console.log'}")
        return EXIT_TIMEOUT
    if code is None:
        log(f"FAILED: the guest never reported an exit code; console log kept: {results / 'console.log'}")
        return EXIT_NO_RESULT
    if args.self_check and args.guest_cmd is None:
        report(results, "selfcheck.xml", "self-check")
        sc = results / "selfcheck-exit-code"
        if not sc.exists() or sc.read_text().strip() != "0":
            log(f"FAILED: the guest self-check ({SELF_CHECK}) failed: the selection was not run")
    if report(results, "junit.xml", "tests") and args.junitxml:
        shutil.copyfile(results / "junit.xml", args.junitxml)
        log(f"JUnit XML copied to {args.junitxml}")
    log(f"guest exit code {code}")
    if code != 0 or args.keep_log:
        log(f"console log: {results / 'console.log'}")
    else:
        (results / "console.log").unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
