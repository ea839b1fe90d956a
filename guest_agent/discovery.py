"""Where the agent finds its token and the collector's address.

In order: the command line, the environment (``FPHINT_TOKEN``,
``FPHINT_COLLECTOR``), the config file (/etc/fphint/agent.toml), QEMU fw_cfg
(``-fw_cfg name=opt/org.fphint/token,string=...``), then SMBIOS type 11 OEM
strings (``-smbios type=11,value=org.fphint.token=...``). Looked up again on
every reconnect, so a token rotated by the host is picked up without a restart.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import AgentError

FW_CFG_DIR = Path("/sys/firmware/qemu_fw_cfg/by_name")
DMI_DIR = Path("/sys/firmware/dmi/entries")
CONFIG_FILE = Path("/etc/fphint/agent.toml")
FW_CFG_TOKEN = "opt/org.fphint/token"
FW_CFG_COLLECTOR = "opt/org.fphint/collector"
OEM_PREFIX = "org.fphint."
#: Longest value read from firmware tables; anything longer is not ours.
MAX_VALUE = 4096


class DiscoveryError(AgentError):
    """A setting given in a place that cannot be read or parsed."""


@dataclass(frozen=True)
class Found:
    value: str
    source: str  # where it came from, for the logs


@dataclass(frozen=True)
class Places:
    env: Mapping[str, str]
    config_file: Path = CONFIG_FILE
    fw_cfg_dir: Path = FW_CFG_DIR
    dmi_dir: Path = DMI_DIR


def _clean(raw: bytes) -> str | None:
    text = raw[:MAX_VALUE].split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()
    return text or None


def read_fw_cfg(name: str, base: Path = FW_CFG_DIR) -> str | None:
    try:
        with open(base / name / "raw", "rb") as f:
            return _clean(f.read(MAX_VALUE + 1))
    except OSError:
        return None


def smbios_oem_strings(dmi_dir: Path = DMI_DIR) -> list[str]:
    """Strings of every SMBIOS type 11 (OEM strings) structure."""
    out: list[str] = []
    try:
        entries = sorted(p for p in dmi_dir.iterdir() if p.name.startswith("11-"))
    except OSError:
        return out
    for entry in entries:
        try:
            raw = (entry / "raw").read_bytes()[: 1 << 16]
        except OSError:
            continue
        if len(raw) < 5 or raw[0] != 11:
            continue
        count = raw[4]
        strings = raw[raw[1] :].split(b"\0")
        out.extend(s.decode("utf-8", errors="replace") for s in strings[:count] if s)
    return out


def read_config(path: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise DiscoveryError(f"{path}: {e}") from None
    out: dict[str, str] = {}
    for key in ("token", "token_file", "collector"):
        if key in data:
            if not isinstance(data[key], str):
                raise DiscoveryError(f"{path}: {key} must be a string")
            out[key] = data[key]
    return out


def _from_oem(key: str, dmi_dir: Path) -> str | None:
    prefixes = (f"{OEM_PREFIX}{key}=", f"io.systemd.credential:fphint.{key}=")
    for s in smbios_oem_strings(dmi_dir):
        for p in prefixes:
            if s.startswith(p):
                return s[len(p) :].strip() or None
    return None


def discover(key: str, cli_value: str | None, places: Places) -> Found | None:
    """Find ``key`` ("token" or "collector") in the documented order."""
    if cli_value:
        return Found(cli_value, "command line")
    env = places.env.get(f"FPHINT_{key.upper()}")
    if env:
        return Found(env, "environment")
    cfg = read_config(places.config_file)
    if key == "token" and "token_file" in cfg:
        try:
            return Found(Path(cfg["token_file"]).read_text().strip(), f"{cfg['token_file']} (from config)")
        except OSError as e:
            raise DiscoveryError(f"token_file {cfg['token_file']}: {e.strerror}") from None
    if cfg.get(key):
        return Found(cfg[key], str(places.config_file))
    name = FW_CFG_TOKEN if key == "token" else FW_CFG_COLLECTOR
    value = read_fw_cfg(name, places.fw_cfg_dir)
    if value:
        return Found(value, f"fw_cfg {name}")
    value = _from_oem(key, places.dmi_dir)
    if value:
        return Found(value, "SMBIOS OEM string")
    return None


def default_places() -> Places:
    return Places(env=os.environ)
