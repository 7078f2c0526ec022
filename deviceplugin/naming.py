"""Names each kind of device as a Kubernetes extended resource, from the pci.ids database.

`short` (default) gives the chip name (`nvidia.com/GA104`); `full` reproduces the names NVIDIA's
kubevirt-gpu-device-plugin and Harvester publish (`nvidia.com/GA104_GEFORCE_RTX_3070`) so existing
KubeVirt `permittedHostDevices` keep working. Every name produced here is a valid extended resource name.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

PCI_IDS_PATHS = ("/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids")
BUNDLED_PCI_IDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pci.ids")
KNOWN_DOMAINS = {"10de": "nvidia.com", "1002": "amd.com", "8086": "intel.com"}
NAMINGS = ("short", "full")
MAX_NAME = 63
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL
SOCKET_PREFIX = "vfio-dp-"
KUBELET_SOCKET = "kubelet.sock"  # the kubelet's Registration socket in the device-plugin dir

_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class PciIds:
    """Vendor and device names of a pci.ids file, looked up on demand.

    The file is 1.6 MB with about 40,000 entries; a node needs a handful of them. Parsing it all costs
    about 60 ms per command, so each lookup searches the text (a C-speed regular expression) for the
    vendor's block, then the device line inside it, and remembers the vendor's block. The file stays
    bytes (a few names are not ASCII, which made the decoded text twice as large and its searches
    slower); a name is decoded when found. The ids are lower-case in every copy of the file: a plain
    substring search finds them; where it does not, a case-insensitive pattern that starts with a
    literal newline decides (the former `^...` with re.M and re.I tried every position: 4 ms per vendor,
    5 ms per device of Intel's 460 kB block).
    """

    def __init__(self, text: str | bytes = "", path: str | None = None) -> None:
        self.path = path
        self._data: bytes | None = _normalized(text)
        self.version = _header(self._data[:8192].decode("utf-8", "replace"), "Version")  # "2026.10.24"
        self.empty = _VENDOR_ANY.search(self._data) is None
        self._blocks: dict[str, tuple[str, int, int] | None] = {}  # vendor -> (name, start, end) of its device lines
        self._names: dict[tuple[str, str], str | None] = {}
        self._vendors: dict[str, str | None] = {}
        self.named: dict[tuple[str, str, str], Naming] = {}  # auto_name's answers: every GPU of a kind asks again

    def release(self) -> None:
        """Drops the file's text (1.6 MB of a 45 MB daemon) and keeps every answer found so far.

        The daemon calls it after each discovery: a node asks for the same few ids at every rescan, and
        a new id (a hot-plugged card) reads the file again. Names already given never change with it.
        """
        if self.path is not None:
            self._data = None
            self._blocks.clear()

    @property
    def _text(self) -> bytes:
        if self._data is None:
            assert self.path is not None
            try:
                with open(self.path, "rb") as f:
                    self._data = _normalized(f.read())
            except OSError:
                return b"\n"  # gone or unreadable now: unknown ids fall back to their number, and it is tried again
        return self._data

    def vendor_name(self, vendor: str) -> str | None:
        if vendor not in self._vendors:
            self._block(vendor)
        return self._vendors.get(vendor)

    def device_name(self, vendor: str, device: str) -> str | None:
        key = (vendor, device)
        if key not in self._names:
            block = self._block(vendor)
            found = None
            if block is not None and _HEX4.fullmatch(device):
                found = self._line(f"\t{device.lower()}  ".encode(), _any_case(f"\n\t{device}  "), block[1], block[2])
            self._names[key] = found
        return self._names[key]

    def _block(self, vendor: str) -> tuple[str, int, int] | None:
        if vendor not in self._blocks:
            block = self._find(vendor.lower()) if _HEX4.fullmatch(vendor) else None
            self._blocks[vendor] = block
            if block is not None or vendor not in self._vendors:  # a name found once is kept when the text is released
                self._vendors[vendor] = block[0] if block else None
        return self._blocks[vendor]

    def _find(self, vendor: str) -> tuple[str, int, int] | None:
        start = self._start(f"{vendor}  ".encode(), _any_case(f"\n{vendor}  "), 0, len(self._text))
        if start < 0:
            return None
        line_end = self._text.find(b"\n", start)
        line_end = len(self._text) if line_end < 0 else line_end
        end = _BLOCK_END.search(self._text, line_end)  # the next vendor, the class section, or the end
        return _name(self._text[start:line_end]), line_end, end.start() + 1 if end else len(self._text)

    def _line(self, head: bytes, pattern: bytes, start: int, end: int) -> str | None:
        """The rest of the first line in [start, end) that begins with `head` (case-insensitive `pattern`)."""
        at = self._start(head, pattern, start, end)
        if at < 0:
            return None
        line_end = self._text.find(b"\n", at, end)
        return _name(self._text[at : end if line_end < 0 else line_end])

    def _start(self, head: bytes, pattern: bytes, start: int, end: int) -> int:
        """Where the text after `head` begins on the first line in [start, end) that begins with it; -1 if none."""
        at = self._text.find(b"\n" + head, start, end)
        if at >= 0:
            return at + 1 + len(head)
        m = re.compile(pattern).search(self._text, start, end)  # not there in lower case: any case, or not at all
        return m.end() if m else -1


def _normalized(text: str | bytes) -> bytes:
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    if b"\r" in data:  # as text mode reads it: universal newlines
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return b"\n" + data  # every entry line, the first too, follows a newline


def _name(line: bytes) -> str:
    """A name as text mode would read it (UTF-8, undecodable bytes replaced), without surrounding blanks."""
    return line.decode("utf-8", "replace").strip()


def _any_case(text: str) -> bytes:
    """'\\n10de  ' -> the pattern of '\\n10[dD][eE]  ': ids in either case, a literal newline first (a fast scan)."""
    return "".join(f"[{c}{c.upper()}]" if c in "abcdef" else re.escape(c) for c in text.lower()).encode()


_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_VENDOR_ANY = re.compile(rb"^[0-9a-fA-F]{4}  ", re.M)
_BLOCK_END = re.compile(rb"\n[^\t#\n]")


def _header(text: str, key: str) -> str | None:
    m = re.search(rf"^#\s*{key}:\s*(\S+)", text[:2048], re.M)
    return m.group(1) if m else None


def parse_pci_ids(text: str, path: str | None = None) -> PciIds:
    return PciIds(text, path)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _version_key(path: str) -> tuple[int, ...]:
    """(2026, 10, 24) from a file's `# Version: 2026.10.24` header; () when there is none (oldest)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            version = _header(f.read(2048), "Version") or ""
    except OSError:
        return ()
    return tuple(int(p) for p in re.findall(r"\d+", version))


def pci_ids_candidates() -> list[str]:
    """The bundled copy and the system's, newest first (by their Version header; the bundled one wins a tie)."""
    found = [p for p in (BUNDLED_PCI_IDS, *PCI_IDS_PATHS) if os.path.isfile(p)]
    return sorted(found, key=_version_key, reverse=True)


def load_pci_ids(explicit: str | None = None) -> PciIds:
    """--pci-ids PATH, else the newest of the bundled copy and the system's; an empty database when none exists.

    An explicit path that cannot be read is an error (the operator asked for it).
    """
    if explicit:
        return PciIds(_read(explicit), explicit)
    for path in pci_ids_candidates():
        try:
            return PciIds(_read(path), path)
        except OSError:
            continue
    return PciIds()


def vendor_domain(vendor: str, db: PciIds) -> str:
    if vendor in KNOWN_DOMAINS:
        return KNOWN_DOMAINS[vendor]
    name = db.vendor_name(vendor) or ""
    first = re.sub(r"[^a-z0-9]", "", name.split()[0].lower()) if name.split() else ""
    return f"{first}.com" if first else f"pci-{vendor}.com"


def short_name(device_name: str) -> str:
    """'GA104 [GeForce RTX 3070]' -> 'GA104'; 'Navi 22 [Radeon ...]' -> 'NAVI_22'."""
    chip = device_name.split("[", 1)[0]
    return re.sub(r"[^A-Z0-9]+", "_", chip.upper()).strip("_")


def full_name(device_name: str) -> str:
    """NVIDIA kubevirt-gpu-device-plugin / Harvester compatible: 'GA104 [GeForce RTX 3070]' -> 'GA104_GEFORCE_RTX_3070'."""
    text = device_name.upper().replace("/", "_").replace(".", "_")
    text = re.sub(r"\s+", "_", text)
    text = re.sub(r"[^A-Z0-9_]", "", text)
    return text.rstrip("_")


def clamp_name(name: str) -> str:
    """Cuts the name part to 63 characters and trims what may not start or end it."""
    return name[:MAX_NAME].strip("_-.")


@dataclass(frozen=True)
class Naming:
    resource: str
    source: str  # "pci.ids", "config rule N", or why it fell back


def auto_name(vendor: str, device: str, db: PciIds, naming: str) -> Naming:
    key = (vendor, device, naming)
    found = db.named.get(key)
    if found is None:
        found = db.named[key] = _auto_name(vendor, device, db, naming)
    return found


def _auto_name(vendor: str, device: str, db: PciIds, naming: str) -> Naming:
    domain = vendor_domain(vendor, db)
    dev_name = db.device_name(vendor, device)
    if dev_name is None:
        why = "no pci.ids database" if db.empty else f"{vendor}:{device} is not in pci.ids"
        return Naming(f"{domain}/{device}", f"fallback to the device id ({why})")
    part = clamp_name(short_name(dev_name) if naming == "short" else full_name(dev_name))
    if not part:
        # Some entries are all brackets or symbols; the other style or the id still gives a usable name.
        part = clamp_name(full_name(dev_name)) or device
        return Naming(f"{domain}/{part}", f"pci.ids name {dev_name!r} has no chip part; used {part!r}")
    return Naming(f"{domain}/{part}", f"pci.ids ({dev_name})")


def resource_name_error(name: str) -> str | None:
    """Why `name` is not a valid extended resource name (the kubelet's check), or None."""
    if name.count("/") != 1:
        return "must be <domain>/<name> with exactly one '/'"
    domain, part = name.split("/")
    if not domain or len(domain) > 253 or not all(_DNS_LABEL.match(label) for label in domain.split(".")):
        return f"domain {domain!r} is not a lower-case DNS subdomain"
    if "." not in domain:
        return f"domain {domain!r} must be qualified (e.g. example.com)"
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        return "the kubernetes.io domain is reserved for Kubernetes' own resources"
    if not part or len(part) > MAX_NAME:
        return f"name part {part!r} must be 1 to {MAX_NAME} characters"
    if not _QUALIFIED_NAME.match(part):
        return f"name part {part!r} must be alphanumerics, '-', '_' or '.', beginning and ending alphanumeric"
    return None


def companion_resource(resource: str, role: str) -> str:
    """`nvidia.com/GA104` + audio -> `nvidia.com/GA104_AUDIO`; the base is cut so the name part stays <= 63."""
    domain, _, part = resource.partition("/")
    suffix = "_" + role.upper()
    return f"{domain}/{clamp_name(part[: MAX_NAME - len(suffix)])}{suffix}"


def env_var_name(resource: str) -> str:
    """KubeVirt's contract: PCI_RESOURCE_ + upper-case name with '/' and '.' replaced by '_'."""
    return "PCI_RESOURCE_" + resource.upper().replace("/", "_").replace(".", "_")


def socket_name(resource: str, plugin_dir: str) -> str:
    """Our socket's basename for a resource; shortened with a hash if the path would not fit sun_path."""
    name = SOCKET_PREFIX + resource.replace("/", "_") + ".sock"
    if len(os.path.join(plugin_dir, name).encode()) <= MAX_SOCKET_PATH:
        return name
    digest = hashlib.sha256(resource.encode()).hexdigest()[:12]
    return f"{SOCKET_PREFIX}{digest}.sock"
