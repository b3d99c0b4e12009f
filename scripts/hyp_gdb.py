"""GDB helpers for the hypervisor, loaded by scripts/gdb (gdb -x).

Commands (see docs/DEBUGGING.md):

  hyp-vcpus        each CPU: where it is stopped (EL, PC) and its vCPU's
                   last exit (guest PC, EL, ESR/EC, fault IPA, exit count)
  hyp-s2 IPA       walks the live stage-2 tables from VTTBR_EL2 and prints
                   every level's descriptor, decoded
  hyp-frames       the frame allocator's counts by owner, and the VM's
                   stage-2 and page-store counts recorded when it stopped
  hyp-probes [--offset N]
                   walks (with hyp-s2) each IPA the hypervisor published
                   in HYP_DEBUG_PROBES when the VM stopped and compares the
                   result with the hypervisor's own translation; prints
                   "hyp-probes: PASS" or "hyp-probes: FAIL". --offset N
                   walks IPA+N instead (a negative control: must FAIL).

Memory is read as *physical* memory (QEMU gdbstub packet
Qqemu.PhyMemMode:1), so the helpers work wherever the CPU stopped, in the
hypervisor (EL2) or in the guest (EL1, whose reads would otherwise go
through the guest's own translation). The hypervisor's statics are at
their physical addresses (RAM is identity mapped at EL2).

The record layouts come from the hypervisor's debug info
(hypervisor/el2/src/vm/debug.rs, hypervisor/el2/src/memory.rs); the
descriptor format is that of hypervisor/stage2/src/desc.rs.
"""

import re
import struct
import sys

try:
    import gdb
except ImportError:  # outside GDB: only the decoder self-test runs (see the end)
    gdb = None

PAGE = 4096
ENTRIES = 512
OA_MASK = 0x0000_FFFF_FFFF_F000
LOCKED = 1 << 55  # software marker (desc.rs LOCKED): a writer's lock
SW_MASK = 0xF << 55  # bits [58:55]: reserved for software use

# debug.rs ProbeKind / ProbeState.
PROBE_KINDS = {
    1: "image start",
    2: "guest DTB",
    3: "demand-mapped page",
    4: "unmapped RAM page",
    5: "outside RAM",
    6: "past the IPA space",
}
PROBE_STATES = {0: "outside", 1: "invalid", 2: "locked", 3: "mapped"}

EXIT_KINDS = {0: "sync", 1: "IRQ", 2: "FIQ", 3: "SError"}
EC_NAMES = {
    0x00: "unknown",
    0x01: "WFI/WFE",
    0x07: "FP/SIMD trap",
    0x0E: "illegal execution state",
    0x16: "HVC64",
    0x17: "SMC64",
    0x18: "MSR/MRS/sys",
    0x20: "instruction abort",
    0x22: "PC alignment",
    0x24: "data abort",
    0x26: "SP alignment",
    0x2F: "SError",
    0x3C: "BRK",
}
# SMCCC function IDs the guest calls (hyp-abi and PSCI 1.1).
FUNCTION_IDS = {
    0x80000000: "SMCCC_VERSION",
    0x80000001: "SMCCC_ARCH_FEATURES",
    0x84000000: "PSCI_VERSION",
    0x84000002: "PSCI_CPU_OFF",
    0x84000003: "PSCI_CPU_ON (32)",
    0xC4000003: "PSCI_CPU_ON",
    0x84000004: "PSCI_AFFINITY_INFO (32)",
    0xC4000004: "PSCI_AFFINITY_INFO",
    0x84000008: "PSCI_SYSTEM_OFF",
    0x84000009: "PSCI_SYSTEM_RESET",
    0x8400000A: "PSCI_FEATURES",
    0x8600FF01: "VENDOR_CALL_UID",
    0x8600FF03: "VENDOR_REVISION",
    0xC6000000: "FEATURES",
    0xC6000001: "EXIT",
    0xC6000002: "STATS",
    0xC6000003: "AGING_FEATURES",
    0xC6000004: "AGING_TEST_CLEAR",
    0xC6000005: "MEM_RELEASE",
    0xC6000006: "STORE_PUT",
    0xC6000007: "STORE_GET",
    0xC6000008: "STORE_DROP",
}
SPSR_MODES = {0b0000: "EL0t", 0b0100: "EL1t", 0b0101: "EL1h", 0b1000: "EL2t", 0b1001: "EL2h"}


class HypGdbError(Exception):
    """A helper could not do its job (printed as an error, no traceback)."""


# ---------------------------------------------------------------- memory


class PhysMem:
    """Context manager: reads physical memory while it is active.

    Switches QEMU's gdbstub to physical-memory mode and restores the mode
    it found. Without that packet (not QEMU, or too old) it falls back to
    the selected CPU's virtual addresses, which are physical ones only when
    that CPU is stopped at EL2 (identity map): `self.note` says so."""

    def __init__(self):
        self.prev = None
        self.physical = False
        self.note = None

    @staticmethod
    def _packet(text):
        out = gdb.execute("maintenance packet " + text, to_string=True)
        m = re.search(r'received: "(.*)"', out)
        return m.group(1) if m else ""

    @staticmethod
    def _flush_cache():
        # GDB's memory cache may hold bytes read in the other mode.
        try:
            gdb.execute("maintenance flush dcache", to_string=True)
        except gdb.error:
            pass

    def __enter__(self):
        self._flush_cache()
        try:
            self.prev = self._packet("qqemu.PhyMemMode")
            if self._packet("Qqemu.PhyMemMode:1") == "OK":
                self.physical = True
        except gdb.error:
            pass
        if not self.physical:
            el = current_el()
            self.note = (
                "note: the gdbstub has no physical-memory mode; reading through "
                "the current CPU's translation (at EL%s)" % el
            )
            if el != 2:
                self.note += ": addresses are NOT physical here, results are unreliable"
        return self

    def __exit__(self, *exc):
        if self.physical and self.prev in ("0", ""):
            try:
                self._packet("Qqemu.PhyMemMode:0")
            except gdb.error:
                pass
        self._flush_cache()
        return False

    @staticmethod
    def read(addr, size):
        try:
            return bytes(gdb.selected_inferior().read_memory(addr, size))
        except gdb.error as e:  # gdb.MemoryError included
            raise HypGdbError("cannot read %d bytes at physical %#x: %s" % (size, addr, e))

    def u64(self, addr):
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def u64s(self, addr, n):
        return list(struct.unpack("<%dQ" % n, self.read(addr, 8 * n)))


# ------------------------------------------------------- symbols, records


def find_static(qualified, plain):
    """(address, gdb.Type or None) of a static, or None if it is missing."""
    try:
        sym = gdb.lookup_global_symbol(qualified)
    except gdb.error:
        sym = None
    if sym is not None:
        return int(sym.value().address), sym.type
    # No debug info for it: the ELF symbol (a #[no_mangle] name) still works.
    try:
        out = gdb.execute("info address " + plain, to_string=True)
    except gdb.error:
        return None
    m = re.search(r"is at (0x[0-9a-fA-F]+)", out)
    return (int(m.group(1), 16), None) if m else None


def field_offsets(gtype, names):
    """Byte offset of each named u64 field: from the debug info when there
    is a type, else the declaration order of the #[repr(C)] struct."""
    if gtype is not None:
        offsets = {f.name: f.bitpos // 8 for f in gtype.strip_typedefs().fields()}
        missing = [n for n in names if n not in offsets]
        if missing:
            raise HypGdbError(
                "%s has no field(s) %s: helpers and hypervisor disagree" % (gtype, ", ".join(missing))
            )
        return offsets
    return {n: 8 * i for i, n in enumerate(names)}


class Record:
    """A #[repr(C)] struct of u64 fields at a physical address."""

    def __init__(self, mem, addr, offsets):
        self.addr = addr
        self.values = {n: mem.u64(addr + off) for n, off in offsets.items()}

    def __getattr__(self, name):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name)


VCPU_FIELDS = ["exits", "pc", "spsr", "kind", "esr", "fault_ipa", "x0"]
VM_FIELDS = [
    "vttbr", "vtcr", "stopped", "ipa_bits", "ram_base", "ram_size", "vcpus",
    "mapped_pages", "table_pages", "store_state", "store_entries",
    "store_bytes", "store_frames",
]
PROBE_FIELDS = ["ipa", "kind", "state", "pa", "level", "perms", "device"]
FRAME_FIELDS = ["total", "free", "guest", "table", "store", "hyp"]


def vm_record(mem):
    found = find_static("hypervisor::vm::debug::HYP_DEBUG_VM", "HYP_DEBUG_VM")
    if found is None:
        return None
    addr, gtype = found
    return Record(mem, addr, field_offsets(gtype, VM_FIELDS))


def vcpu_records(mem):
    found = find_static("hypervisor::vm::debug::HYP_DEBUG_VCPUS", "HYP_DEBUG_VCPUS")
    if found is None:
        return []
    addr, gtype = found
    if gtype is not None:
        elem = gtype.strip_typedefs().target()
        lo, hi = gtype.strip_typedefs().range()
        count, stride = hi - lo + 1, elem.sizeof
    else:
        elem, count, stride = None, 8, 8 * len(VCPU_FIELDS)
    offsets = field_offsets(elem, VCPU_FIELDS)
    return [Record(mem, addr + i * stride, offsets) for i in range(count)]


def probe_records(mem):
    """The published probes (empty until the VM stopped)."""
    found = find_static("hypervisor::vm::debug::HYP_DEBUG_PROBES", "HYP_DEBUG_PROBES")
    if found is None:
        raise HypGdbError("HYP_DEBUG_PROBES is not in this hypervisor build")
    addr, gtype = found
    if gtype is not None:
        t = gtype.strip_typedefs()
        fields = {f.name: f for f in t.fields()}
        count_off = fields["count"].bitpos // 8
        arr_off = fields["probes"].bitpos // 8
        arr = fields["probes"].type.strip_typedefs()
        elem, stride = arr.target(), arr.target().sizeof
        capacity = arr.range()[1] - arr.range()[0] + 1
    else:
        count_off, arr_off, elem = 0, 8, None
        stride, capacity = 8 * len(PROBE_FIELDS), 8
    count = min(mem.u64(addr + count_off), capacity)
    offsets = field_offsets(elem, PROBE_FIELDS)
    return [Record(mem, addr + arr_off + i * stride, offsets) for i in range(count)]


# ----------------------------------------------------------- CPU registers


def cpu_of(thread):
    """QEMU numbers its gdbstub threads CPU index + 1."""
    tid = thread.ptid[1] or thread.ptid[2]
    return (tid if tid else thread.num) - 1


def read_regs(names, thread=None):
    """{name: value or None} of the given thread (default: the selected one)."""
    cur = gdb.selected_thread()
    frame = None
    try:
        frame = gdb.selected_frame()
    except gdb.error:
        pass
    if thread is not None and thread != cur:
        thread.switch()
    try:
        f = gdb.newest_frame()
        out = {}
        for n in names:
            try:
                out[n] = int(f.read_register(n)) & (2**64 - 1)
            except (ValueError, gdb.error):
                out[n] = None
        return out
    finally:
        if thread is not None and thread != cur:
            cur.switch()
            if frame is not None and frame.is_valid():
                frame.select()


def current_el():
    v = read_regs(["cpsr"]).get("cpsr")
    return None if v is None else (v >> 2) & 3


def pstate_str(v):
    return "%s (%#x)" % (SPSR_MODES.get(v & 0xF, "M=%#x" % (v & 0xF)), v)


def hyp_symbol(pc):
    """The hypervisor function containing pc (debug info, else ELF symbol)."""
    block = gdb.current_progspace().block_for_pc(pc)
    while block is not None and block.function is None:
        block = block.superblock
    if block is not None:
        return block.function.print_name
    try:
        out = gdb.execute("info symbol %#x" % pc, to_string=True)
    except gdb.error:
        return "?"
    m = re.match(r"(.+?) in section ", out)
    return m.group(1) if m else "?"


def live_threads():
    inf = gdb.selected_inferior()
    if inf.pid == 0:
        raise HypGdbError("no live target: connect first (target remote ...)")
    threads = sorted(inf.threads(), key=cpu_of)
    if any(t.is_running() for t in threads):
        raise HypGdbError("the target is running: interrupt it first")
    return threads


# ------------------------------------------------------------ stage 2


class S2Context:
    """VTTBR_EL2 / VTCR_EL2 of the VM and where they came from."""

    def __init__(self, vttbr, vtcr, source):
        self.vttbr, self.vtcr, self.source = vttbr, vtcr, source
        self.root = vttbr & 0x0000_FFFF_FFFF_FFFE
        self.vmid = (vttbr >> 48) & 0xFFFF
        self.t0sz = vtcr & 0x3F
        self.ipa_bits = 64 - self.t0sz
        sl0 = (vtcr >> 6) & 3
        tg0 = (vtcr >> 14) & 3
        self.ha = (vtcr >> 21) & 1
        if tg0 != 0:
            raise HypGdbError("VTCR_EL2.TG0=%d: only the 4 KiB granule is supported" % tg0)
        if sl0 == 3:
            raise HypGdbError("VTCR_EL2.SL0=3 (start level 3) is not supported")
        self.start_level = 2 - sl0

    def describe(self):
        return (
            "VTTBR_EL2=%#x (%s): VMID %d, root table %#x\n"
            "VTCR_EL2=%#x: T0SZ=%d (%d-bit IPA), 4 KiB granule, start level %d, HA=%d (%s AF)"
            % (self.vttbr, self.source, self.vmid, self.root, self.vtcr, self.t0sz,
               self.ipa_bits, self.start_level, self.ha,
               "hardware" if self.ha else "software")
        )


def s2_context(mem):
    """The VM's stage-2 registers: the selected CPU's, another CPU's, or
    the value the hypervisor recorded (debug.rs), in that order."""
    rec = vm_record(mem)
    recorded = None
    if rec is not None and rec.vttbr:
        recorded = (rec.vttbr, rec.vtcr)
    names = ["VTTBR_EL2", "VTCR_EL2"]
    candidates = [(gdb.selected_thread(), "register of the selected CPU")]
    candidates += [(t, "register of CPU#%d" % cpu_of(t)) for t in live_threads()]
    for thread, what in candidates:
        regs = read_regs(names, thread)
        vttbr, vtcr = regs["VTTBR_EL2"], regs["VTCR_EL2"]
        if vttbr is None or vtcr is None:
            break  # the gdbstub does not show them at all
        if vttbr & 0x0000_FFFF_FFFF_FFFE:
            ctx = S2Context(vttbr, vtcr, what)
            if recorded is not None and recorded[0] != vttbr:
                ctx.source += "; the hypervisor recorded %#x" % recorded[0]
            return ctx
    if recorded is not None:
        return S2Context(recorded[0], recorded[1], "recorded by the hypervisor in HYP_DEBUG_VM")
    raise HypGdbError(
        "no stage 2 yet: VTTBR_EL2 is 0 on every CPU and the hypervisor recorded none "
        "(the VM is created after boot; continue until the guest runs)"
    )


def level_shift(level):
    return 12 + 9 * (3 - level)


def decode_memattr(raw):
    attr = (raw >> 2) & 0xF
    outer, inner = attr >> 2, attr & 3
    if outer == 0:
        kind = {0: "nGnRnE", 1: "nGnRE", 2: "nGRE", 3: "GRE"}[inner]
        return "Device-%s" % kind, True
    names = {1: "NC", 2: "WT", 3: "WB"}
    return "Normal outer %s inner %s" % (names[outer], names.get(inner, "?")), False


def decode_leaf_attrs(raw):
    """(text, perms bits R=1 W=2 X=4, device) of a block or page."""
    s2ap = (raw >> 6) & 3
    perms = (1 if s2ap & 1 else 0) | (2 if s2ap & 2 else 0) | (0 if raw & (1 << 54) else 4)
    mem, device = decode_memattr(raw)
    sh = {0: "non-shareable", 1: "SH=01 (reserved)", 2: "outer shareable", 3: "inner shareable"}[(raw >> 8) & 3]
    xn = (raw >> 53) & 3
    parts = [
        "S2AP=%s" % {0: "none", 1: "RO", 2: "WO", 3: "RW"}[s2ap],
        "XN=%d%d" % (xn >> 1, xn & 1),
        "(%s)" % perms_str(perms),
        mem,
        sh,
        "AF=%d" % ((raw >> 10) & 1),
    ]
    if raw & (1 << 51):
        parts.append("DBM")
    if raw & (1 << 52):
        parts.append("contiguous")
    if raw & SW_MASK:
        parts.append("SW[58:55]=%#x" % ((raw & SW_MASK) >> 55))
    return " ".join(parts), perms, device


def perms_str(p):
    return "".join(c if p & b else "-" for c, b in (("R", 1), ("W", 2), ("X", 4)))


def table_summary(entries):
    valid = sum(1 for e in entries if e & 1)
    locked = sum(1 for e in entries if not e & 1 and e & LOCKED)
    empty = len(entries) - valid - locked
    text = "%d valid, %d empty, %d locked" % (valid, empty, locked)
    if locked == len(entries):
        text += ": SEALED (every entry locked: the table is being removed)"
    return text


class WalkResult:
    def __init__(self, ipa, ctx):
        self.ipa, self.ctx = ipa, ctx
        self.lines = []
        self.outcome = None  # mapped | invalid | locked | outside
        self.level = None
        self.pa = None
        self.perms = None
        self.device = None

    def summary(self):
        if self.outcome == "mapped":
            return "PA %#x (%s L%d, %s, %s)" % (
                self.pa, "page" if self.level == 3 else "block", self.level,
                perms_str(self.perms), "Device" if self.device else "Normal")
        if self.outcome == "outside":
            return "not mapped (outside the %d-bit IPA space)" % self.ctx.ipa_bits
        return "not mapped (%s entry at level %d)" % (self.outcome, self.level)


def walk(mem, ctx, ipa):
    """Walks the stage-2 tables of `ctx` for `ipa`, like the MMU does."""
    r = WalkResult(ipa, ctx)
    if ipa >= 1 << ctx.ipa_bits or ipa < 0:
        r.outcome, r.level = "outside", ctx.start_level
        r.lines.append(
            "  IPA %#x >= 2^%d: translation fault at level %d (T0SZ), no table is read"
            % (ipa, ctx.ipa_bits, ctx.start_level))
        return r
    table = ctx.root
    for level in range(ctx.start_level, 4):
        entries = mem.u64s(table, ENTRIES)
        idx = (ipa >> level_shift(level)) & (ENTRIES - 1)
        raw = entries[idx]
        addr = table + 8 * idx
        head = "  L%d table %#x (%s)\n    [%3d] @%#x = %#018x  " % (
            level, table, table_summary(entries), idx, addr, raw)
        if not raw & 1:
            if raw & LOCKED:
                r.outcome = "locked"
                what = ("LOCKED (software marker: a writer's break-before-make, a pin, "
                        "or a sealed table): not mapped, walkers retry")
            else:
                r.outcome = "invalid"
                what = "invalid: translation fault at level %d" % level
            if raw & ~LOCKED:
                what += " (other bits %#x)" % (raw & ~LOCKED)
            r.lines.append(head + what)
            r.level = level
            return r
        table_or_page = raw & 2
        if level < 3 and table_or_page:
            nxt = raw & OA_MASK
            r.lines.append(head + "table -> %#x" % nxt)
            table = nxt
            continue
        if (level == 0 and not table_or_page) or (level == 3 and not table_or_page):
            r.outcome, r.level = "invalid", level
            r.lines.append(head + "reserved encoding (%s at level %d): translation fault"
                           % ("block" if level == 0 else "bit 1 clear", level))
            return r
        size = 1 << level_shift(level)
        oa = raw & OA_MASK & ~(size - 1)
        text, perms, device = decode_leaf_attrs(raw)
        kind = "page" if level == 3 else "block (%s)" % ("1 GiB" if level == 1 else "2 MiB")
        r.lines.append(head + "%s OA=%#x %s" % (kind, oa, text))
        r.outcome, r.level = "mapped", level
        r.pa = oa | (ipa & (size - 1))
        r.perms, r.device = perms, device
        return r
    raise HypGdbError("walk did not end at level 3")  # unreachable


LAST_WALK = None


def parse_int(arg, what):
    arg = arg.strip()
    if not arg:
        raise HypGdbError("usage: %s" % what)
    try:
        return int(gdb.parse_and_eval(arg)) & (2**64 - 1)
    except gdb.error:
        try:
            return int(arg, 0)
        except ValueError:
            raise HypGdbError("not a number or expression: %s" % arg)


# ------------------------------------------------------------- commands


class HypCommand(gdb.Command if gdb is not None else object):
    def invoke(self, arg, from_tty):
        try:
            live_threads()  # a stopped, connected target first
            self.run(arg)
        except HypGdbError as e:
            raise gdb.GdbError("%s: %s" % (self.NAME, e))


class HypS2(HypCommand):
    """hyp-s2 IPA: walk the live stage-2 tables for IPA (an expression).

Starts from VTTBR_EL2 (the CPU's register, else the value the hypervisor
recorded), reads each level's table from physical memory and prints the
entry decoded: table pointer, block or page with its output address,
S2AP/XN permissions, memory type, shareability, AF, and the software
LOCKED marker (writer's break-before-make, pin, sealed table). Each
table's line counts its valid / empty / locked entries."""

    NAME = "hyp-s2"

    def __init__(self):
        super().__init__(self.NAME, gdb.COMMAND_DATA)

    def run(self, arg):
        global LAST_WALK
        ipa = parse_int(arg, "hyp-s2 IPA")
        with PhysMem() as mem:
            if mem.note:
                print(mem.note)
            ctx = s2_context(mem)
            print(ctx.describe())
            r = walk(mem, ctx, ipa)
        print("IPA %#x:" % ipa)
        for line in r.lines:
            print(line)
        print("  => IPA %#x -> %s" % (ipa, r.summary()))
        LAST_WALK = r


class HypVcpus(HypCommand):
    """hyp-vcpus: each CPU's state and its vCPU's last exit.

For every CPU (GDB thread): where it is stopped now (EL2 = in the
hypervisor, EL1/EL0 = in the guest) with its PC, and from the
hypervisor's per-vCPU record (HYP_DEBUG_VCPUS, written on every exit):
the exit count, the guest PC and EL at the last exit, its kind and ESR
(exception class decoded), and the IPA of a stage-2 abort."""

    NAME = "hyp-vcpus"

    def __init__(self):
        super().__init__(self.NAME, gdb.COMMAND_STATUS)

    def run(self, arg):
        threads = live_threads()
        selected = gdb.selected_thread()
        with PhysMem() as mem:
            if mem.note:
                print(mem.note)
            records = vcpu_records(mem)
            vm = vm_record(mem)
        if not records:
            print("HYP_DEBUG_VCPUS is not in this hypervisor build: live state only")
        nvcpus = vm.vcpus if vm is not None and vm.stopped else None
        if nvcpus is not None:
            print("VM stopped with %d vCPU(s)" % nvcpus)
        shown = set()
        for t in threads:
            cpu = cpu_of(t)
            shown.add(cpu)
            regs = read_regs(["pc", "cpsr"], t)
            pc, cpsr = regs["pc"], regs["cpsr"]
            el = (cpsr >> 2) & 3 if cpsr is not None else None
            where = "EL%s%s" % (el, "h" if cpsr is not None and cpsr & 1 else "t")
            if el == 2:
                where += " (hypervisor)"
            elif el is not None:
                where += " (guest)"
            sym = ""
            if el == 2 and pc is not None:
                sym = " <%s>" % hyp_symbol(pc)
            mark = "*" if t == selected else " "
            print("%scpu%d (thread %d): now %s pc=%#x%s"
                  % (mark, cpu, t.num, where, pc or 0, sym))
            if cpu < len(records):
                print("    " + self.describe(cpu, records[cpu]))
        for i, r in enumerate(records):
            if i not in shown and r.exits:
                print("  vcpu%d (no GDB thread): %s" % (i, self.describe(i, r)))

    @staticmethod
    def describe(i, r):
        if not r.exits:
            return "vcpu%d: no exit recorded (not started, or not a vCPU's CPU)" % i
        kind = EXIT_KINDS.get(r.kind, "AArch32 exception (%d)" % r.kind)
        text = "vcpu%d: %d exits; last: %s at guest pc=%#x %s" % (
            i, r.exits, kind, r.pc, pstate_str(r.spsr))
        if r.kind == 0:
            ec = (r.esr >> 26) & 0x3F
            text += ", ESR=%#x EC=%#x (%s)" % (r.esr, ec, EC_NAMES.get(ec, "?"))
            if ec in (0x16, 0x17):
                fid = r.x0 & 0xFFFFFFFF
                text += " fid=%#x %s" % (fid, FUNCTION_IDS.get(fid, "(unknown)"))
            if ec in (0x20, 0x24):
                fsc = r.esr & 0x3F
                lvl = fsc & 3
                fsc_name = {0b0001: "translation", 0b0010: "access flag",
                            0b0011: "permission"}.get(fsc >> 2)
                what = ("%s fault L%d" % (fsc_name, lvl)) if fsc_name else ("FSC=%#x" % fsc)
                if ec == 0x24:
                    what += ", write" if r.esr & (1 << 6) else ", read"
                text += " %s at IPA %#x" % (what, r.fault_ipa)
        return text


class HypFrames(HypCommand):
    """hyp-frames: frame allocator counts by owner, and store counts.

Live counts from HYP_FRAMES (the frame allocator's counters by owner),
then the VM's counters recorded when it stopped (HYP_DEBUG_VM: stage-2
mapped pages and table pages, page-store entries, payload bytes and
frames)."""

    NAME = "hyp-frames"

    def __init__(self):
        super().__init__(self.NAME, gdb.COMMAND_STATUS)

    def run(self, arg):
        with PhysMem() as mem:
            if mem.note:
                print(mem.note)
            found = find_static("hypervisor::memory::HYP_FRAMES", "HYP_FRAMES")
            frames = None
            if found is not None:
                frames = Record(mem, found[0], field_offsets(found[1], FRAME_FIELDS))
            vm = vm_record(mem)
        if frames is None:
            print("frames: HYP_FRAMES is missing from this hypervisor build (no frame counters)")
        else:
            def mib(n):
                return n * PAGE / (1 << 20)

            print("frames (HYP_FRAMES, live): total %d (%.1f MiB)" % (frames.total, mib(frames.total)))
            for name in FRAME_FIELDS[1:]:
                v = getattr(frames, name)
                print("  %-6s %9d  %8.1f MiB" % (name, v, mib(v)))
            owned = sum(getattr(frames, n) for n in FRAME_FIELDS[1:])
            if owned == frames.total:
                print("  free + guest + table + store + hyp = total: consistent")
            else:
                print("  free + guest + table + store + hyp = %d, total %d: INCONSISTENT by %+d "
                      "(or a CPU is stopped inside the allocator)"
                      % (owned, frames.total, owned - frames.total))
        if vm is None:
            print("VM: HYP_DEBUG_VM is missing from this hypervisor build")
        elif not vm.stopped:
            print("VM: counters are recorded when the VM stops "
                  "(break hyp_debug_probes_ready, or continue to its end)")
        else:
            print("VM at stop (HYP_DEBUG_VM): RAM %#x+%#x, stage 2: %d mapped pages, %d table pages"
                  % (vm.ram_base, vm.ram_size, vm.mapped_pages, vm.table_pages))
            store = {
                0: "no page store (store=0)",
                1: "%d entries, %d payload bytes, %d frames"
                   % (vm.store_entries, vm.store_bytes, vm.store_frames),
                2: "its lock was held when the VM stopped: not recorded",
            }.get(vm.store_state, "state %d?" % vm.store_state)
            print("  page store: " + store)


class HypProbes(HypCommand):
    """hyp-probes [--offset N]: check hyp-s2 against the hypervisor.

For each IPA in HYP_DEBUG_PROBES (published when the VM stops, just
before hyp_debug_probes_ready is called) runs `hyp-s2 IPA` and compares
its result with the hypervisor's own translation (Stage2::translate):
output address, leaf level, permissions and memory type when mapped,
the kind of entry (invalid, locked, outside the IPA space) when not.
Prints "hyp-probes: PASS (n/n match)" or "hyp-probes: FAIL ...".
--offset N walks IPA+N instead (negative control: must FAIL)."""

    NAME = "hyp-probes"

    def __init__(self):
        super().__init__(self.NAME, gdb.COMMAND_DATA)

    def run(self, arg):
        words = arg.split()
        offset = 0
        if words[:1] == ["--offset"] and len(words) == 2:
            offset = parse_int(words[1], "hyp-probes [--offset N]")
        elif words:
            raise HypGdbError("usage: hyp-probes [--offset N]")
        with PhysMem() as mem:
            probes = probe_records(mem)
        if not probes:
            print("hyp-probes: FAIL (no probes published: break on hyp_debug_probes_ready, "
                  "which runs when the VM stops)")
            return
        if offset:
            print("hyp-probes: negative control: walking IPA%+#x for each probe" % offset)
        bad = 0
        for p in probes:
            name = PROBE_KINDS.get(p.kind, "kind %d" % p.kind)
            print("--- probe %s: IPA %#x" % (name, p.ipa))
            gdb.execute("hyp-s2 %#x" % ((p.ipa + offset) & (2**64 - 1)))
            got = LAST_WALK
            state = PROBE_STATES.get(p.state, "state %d" % p.state)
            if state == "mapped":
                want = "PA %#x (L%d, %s, %s)" % (
                    p.pa, p.level, perms_str(p.perms), "Device" if p.device else "Normal")
                ok = (got.outcome == "mapped" and got.pa == p.pa and got.level == p.level
                      and got.perms == p.perms and bool(got.device) == bool(p.device))
            else:
                want = "not mapped (%s)" % state
                ok = got.outcome == state
            bad += not ok
            print("probe %-20s IPA %#-14x hypervisor: %-40s gdb: %s  %s"
                  % (name, p.ipa, want, got.summary(), "MATCH" if ok else "MISMATCH"))
        n = len(probes)
        if bad:
            print("hyp-probes: FAIL (%d of %d probes differ)" % (bad, n))
        else:
            print("hyp-probes: PASS (%d/%d match)" % (n, n))


# ------------------------------------------------------------ self-test


class FakeMem:
    """Physical memory made of table pages, for the self-test."""

    def __init__(self):
        self.pages = {}

    def table(self, pa, entries):
        page = [0] * ENTRIES
        for i, v in entries.items():
            page[i] = v
        self.pages[pa] = page

    def u64s(self, addr, n):
        if addr % PAGE or addr not in self.pages or n != ENTRIES:
            raise HypGdbError("self-test read outside the fake tables: %#x" % addr)
        return list(self.pages[addr])


def self_test():
    """Checks the walk and the decoder on hand-built tables, with the
    encodings of hypervisor/stage2/src/desc.rs's tests. Returns the exit
    status (0: pass)."""
    mem = FakeMem()
    root, l1, l2, l3, sealed = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
    mem.table(root, {0: l1 | 3})
    # 1 GiB blocks at IPA 2 GiB and 3 GiB (the second with RES0 bits 21+).
    mem.table(l1, {1: l2 | 3, 2: 0x8000_07FD, 3: 0x8020_07FD})
    mem.table(l2, {0: l3 | 3, 1: 0x0040_0000_4020_07FD, 2: LOCKED, 3: sealed | 3})
    mem.table(l3, {0: 0x0040_0000_4000_17FF, 1: 0x0040_0000_0900_0347, 2: LOCKED,
                   3: 0x0040_0000_4000_17FD})
    mem.table(sealed, {i: LOCKED for i in range(ENTRIES)})
    ctx = S2Context(root | (1 << 48), 0x253590, "self-test")
    g = 1 << 30
    cases = [
        # IPA, outcome, level, PA, perms, device
        (g + 0x123, "mapped", 3, 0x4000_1123, 3, False),      # RW page, XN
        (g + 0x1008, "mapped", 3, 0x0900_0008, 1, True),      # RO Device-nGnRE
        (g + 0x2000, "locked", 3, None, None, None),          # writer's lock
        (g + 0x3000, "invalid", 3, None, None, None),         # bit 1 clear at L3
        (g + 0x4000, "invalid", 3, None, None, None),         # empty slot
        (g + 0x20_0000 + 0x1234, "mapped", 2, 0x4020_1234, 3, False),  # 2 MiB block
        (g + 0x40_0000, "locked", 2, None, None, None),       # locked at L2
        (g + 0x60_0000, "locked", 3, None, None, None),       # inside a sealed table
        (2 * g + 0x5678, "mapped", 1, 0x8000_5678, 7, False),  # 1 GiB RWX block
        (3 * g + 0x5678, "mapped", 1, 0x8000_5678, 7, False),  # RES0 bits dropped
        (0x2000_0000, "invalid", 1, None, None, None),
        (1 << 48, "outside", 0, None, None, None),
    ]
    bad = 0
    for ipa, outcome, level, pa, perms, device in cases:
        r = walk(mem, ctx, ipa)
        got = (r.outcome, r.level, r.pa, r.perms, None if r.device is None else bool(r.device))
        want = (outcome, level, pa, perms, device)
        if got != want:
            bad += 1
            print("self-test: IPA %#x: got %s, want %s" % (ipa, got, want))
            for line in r.lines:
                print(line)
    text, _, _ = decode_leaf_attrs(0x0040_0000_4000_17FF)
    want_text = "S2AP=RW XN=10 (RW-) Normal outer WB inner WB inner shareable AF=1"
    if text != want_text:
        bad += 1
        print("self-test: decode %r, want %r" % (text, want_text))
    if "SEALED" not in table_summary(mem.pages[sealed]):
        bad += 1
        print("self-test: a table of locked entries is not reported sealed")
    print("hyp_gdb self-test: %s (%d cases)" % ("FAIL" if bad else "PASS", len(cases) + 2))
    return 1 if bad else 0


if gdb is not None:
    HypS2()
    HypVcpus()
    HypFrames()
    HypProbes()
elif __name__ == "__main__":
    sys.exit(self_test())
