"""The scenarios of the boot test: what each puts in its guest, and how its verdict is
read from what the guest's collector wrote (evidence.Boot)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from evidence import AGENT, SERVER, Boot, about_unit, message, of_unit, seconds

SIGN_URL = "http://127.0.0.1:8000/sign"
GATEWAY_URL = "https://127.0.0.1:8443"
# What the kit's device gateway gives every device (boot-test-server.service).
CONFIG_NAME = "boot-test-config"
CONFIG_TEXT = "delivered encrypted by the kit's device gateway\n"
# A development image: the recipe installs this (throwaway) API token as the token file.
BASE_VARIABLES = {"LMP_AUTOREG_DEVICE_API": SIGN_URL, "LMP_DEVICE_REGISTER_TOKEN": "boot-test"}
SECURITY_MAX = 2.5
# Devices the unit's DevicePolicy=closed must refuse, and one it must allow.
DENIED = "/dev/net/tun"
ALLOWED = "/dev/null"
# The guest's SoftHSM2 (Debian's softhsm2) and the throwaway PINs of its token.
HSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
HSM_PIN = "boot-test-pin"
HSM_SO_PIN = "boot-test-so-pin"


@dataclass
class BootSpec:
    collect: dict[str, Any]  # the collector's scenario.json
    before: Callable[[Path], None] | None = None  # changes the tree before this boot
    bpf: bool = False  # --system-call-filter=bpf, the guest on cgroup v2 (DevicePolicy=)

    def scaled(self, slowdown: float) -> dict[str, Any]:
        """The collector's scenario.json on a root ``slowdown`` times slower than native."""
        if "deadline" not in self.collect:
            return self.collect
        return {**self.collect, "deadline": self.collect["deadline"] * slowdown}

    def timeout(self, slowdown: float = 1.0) -> float:
        return (float(self.collect.get("deadline", 90)) + 60) * slowdown


@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the scenario did not run

    def expect(self, ok: bool, failure: str) -> bool:
        if not ok:
            self.failures.append(failure)
        return ok


@dataclass
class Scenario:
    number: int
    title: str
    boots: list[BootSpec]
    check: Callable[[list[Boot], Verdict], None]
    variables: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    hsm: bool = False  # on the roots with SoftHSM2 and python-pkcs11 only (rootfs.Root.hsm)


def settle(*units: str, deadline: int = 90, **more: Any) -> dict[str, Any]:
    return {"settle": [AGENT, *units], "deadline": deadline, **more}


def drop_in(tree: Path, unit: str, text: str, name: str = "boot-test.conf") -> None:
    path = tree / "etc/systemd/system" / f"{unit}.d" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def late_server(seconds_: int) -> Callable[[Path], None]:
    def setup(tree: Path) -> None:
        drop_in(tree, SERVER, f"[Service]\nExecStartPre=/bin/sleep {seconds_}\n"
                              "TimeoutStartSec=120\n")
    return setup


# -- reading the evidence ----------------------------------------------------------------

def collected(boot: Boot, v: Verdict, which: str = "the boot") -> bool:
    if boot.returncode is None:
        v.failures.append(f"{which} hung: container stopped after {boot.seconds:.0f} s")
        return False
    if not v.expect(boot.complete, f"{which} collected nothing (exit "
                                   f"{boot.returncode}, {boot.seconds:.0f} s)"):
        return False
    if boot.collected.get("timed_out"):
        # What the guest showed at the deadline still says what went wrong: check it too.
        v.failures.append(f"{which}: the units did not settle within the collector's "
                          f"{boot.collected['seconds']:.0f} s")
    return True


def this_boot(boot: Boot) -> list[dict[str, Any]]:
    assert boot.out is not None
    return [e for e in boot.journal() if e.get("_BOOT_ID") == boot.out.name.replace("-", "")]


def agent_fields(entries: list[dict[str, Any]], name: str) -> list[str]:
    return [str(e[name]) for e in of_unit(entries, AGENT) if name in e]


def unit_state(unit: dict[str, str]) -> str:
    return (f"{unit.get('ActiveState')} ({unit.get('SubState')}), result {unit.get('Result')}, "
            f"exit {unit.get('ExecMainStatus')}, restarts {unit.get('NRestarts')}")


def expect_unit(v: Verdict, boot: Boot, active: str, sub: str, status: int,
                restarts: int | None = 0) -> None:
    unit = boot.unit()
    ok = (unit.get("ActiveState") == active and unit.get("SubState") == sub
          and unit.get("ExecMainStatus") == str(status)
          and (restarts is None or unit.get("NRestarts") == str(restarts)))
    want = f"{active} ({sub}), exit {status}" + (f", restarts {restarts}"
                                                 if restarts is not None else "")
    v.expect(ok, f"agent's unit: want {want}; got {unit_state(unit)}")


def registered(v: Verdict, boot: Boot) -> None:
    names = boot.var_sota() or []
    missing = [n for n in ("sota.toml", "client.pem", "pkey.pem", "root.crt") if n not in names]
    v.expect(not missing, f"/var/sota lacks {', '.join(missing)} (has {names})")


def exit_codes(entries: list[dict[str, Any]]) -> list[str]:
    return agent_fields(entries, "LMP_EXIT_CODE")


def requests(entries: list[dict[str, Any]]) -> list[str]:
    """The server's lines about requests it received (its journal)."""
    return [message(e) for e in of_unit(entries, SERVER) if "/sign" in message(e)
            and "POST" in message(e)]


# -- the scenarios -----------------------------------------------------------------------

def check_first_boot(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    expect_unit(v, boot, "active", "exited", 0)
    registered(v, boot)
    text = boot.unit().get("StatusText", "")
    v.expect(bool(text), "the unit has no STATUS= text")
    v.expect(f'Status: "{text}"' in boot.text("status.txt"),
             f"systemctl status does not show the last STATUS= ({text!r}):\n"
             + boot.text("status.txt"))
    entries = this_boot(boot)
    v.expect(bool(agent_fields(entries, "LMP_UUID")), "no LMP_UUID in the agent's journal")
    factories = set(agent_fields(entries, "LMP_FACTORY"))
    v.expect(factories == {"boot-test"}, f"LMP_FACTORY in the journal: {factories or 'none'}")
    v.expect(exit_codes(entries) == ["0"], f"LMP_EXIT_CODE in the journal: {exit_codes(entries)}")
    # Also proves that requests() sees the server's lines (scenario 2 counts on none).
    v.expect(len(requests(entries)) == 1, f"the server's requests: {requests(entries)}")


def mask_aktualizr(tree: Path) -> None:
    (tree / "var/sota/sql.db").unlink(missing_ok=True)
    (tree / "etc/systemd/system/aktualizr-lite.service").symlink_to("/dev/null")


def check_second_boot(boots: list[Boot], v: Verdict) -> None:
    first, second, third = boots
    if not collected(first, v, "first boot"):
        return
    v.expect("sql.db" in (first.var_sota() or []),
             "first boot: aktualizr-lite's stand-in did not create sql.db")
    if collected(second, v, "second boot"):
        unit = second.unit()
        v.expect(unit.get("ConditionResult") == "no"
                 and unit.get("ExecMainStartTimestampMonotonic") == "0",
                 f"second boot: the unit was not skipped by its condition: {unit_state(unit)}, "
                 f"condition {unit.get('ConditionResult')}")
        entries = this_boot(second)
        v.expect(not of_unit(entries, AGENT), "second boot: the agent ran")
        v.expect(not requests(entries), f"second boot: requests sent: {requests(entries)}")
    if collected(third, v, "third boot (sql.db removed)"):
        expect_unit(v, third, "active", "exited", 3)
        entries = this_boot(third)
        v.expect(not requests(entries), f"third boot: requests sent: {requests(entries)}")


def check_late_server(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    expect_unit(v, boot, "active", "exited", 0)
    registered(v, boot)
    entries = this_boot(boot)
    listening = [seconds(e) for e in of_unit(entries, SERVER) if SIGN_URL in message(e)]
    done = [seconds(e) for e in of_unit(entries, AGENT) if e.get("LMP_EXIT_CODE") == "0"]
    if v.expect(bool(listening) and bool(done),
                "cannot time it: no server line with its sign URL or no LMP_EXIT_CODE=0"):
        v.notes.append(f"seconds from server listening to device registered: "
                       f"{done[0] - listening[0]:.1f}")


def check_outage(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    expect_unit(v, boot, "active", "exited", 0, restarts=None)
    registered(v, boot)
    unit = boot.unit()
    v.expect(int(unit.get("NRestarts") or 0) >= 1, f"not restarted: {unit_state(unit)}")
    entries = this_boot(boot)
    codes = exit_codes(entries)
    v.expect(bool(codes) and set(codes[:-1]) == {"5"} and codes[-1] == "0",
             f"exit codes of the runs: want 5 (repeated) then 0; got {codes}")
    uuids = set(agent_fields(entries, "LMP_UUID"))
    v.expect(len(uuids) == 1, f"uuids across the runs: {sorted(uuids)}")
    sent = requests(entries)
    v.expect(len(sent) == 1, f"the server, down until the last run, received: {sent}")
    cert = boot.file("/var/sota/client.pem")
    if v.expect(cert.exists(), "no client.pem"):
        cn = x509.load_pem_x509_certificate(cert.read_bytes()).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)
        v.expect([a.value for a in cn] == sorted(uuids),
                 f"the certificate's CN {[a.value for a in cn]} is not the runs' uuid "
                 f"{sorted(uuids)}")


def failing_fioconfig(tree: Path) -> None:
    (tree / "etc/boot-test").mkdir()
    (tree / "etc/boot-test/fioconfig-fails").touch()


def outage(tree: Path) -> None:
    late_server(25)(tree)
    drop_in(tree, AGENT, "[Service]\nEnvironment=REGISTRATION_TIMEOUT=8\nRestartSec=2\n")


def check_failed_post_step(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    registered(v, boot)
    unit = boot.unit()
    v.expect(unit.get("ActiveState") == "failed" and unit.get("Result") == "exit-code"
             and unit.get("ExecMainStatus") == "7" and unit.get("NRestarts") == "0",
             f"after exit 7 the unit must stay failed, not restarted; got {unit_state(unit)}")
    codes = exit_codes(this_boot(boot))
    v.expect(codes == ["7"], f"LMP_EXIT_CODE in the journal: want [7]; got {codes}")


def override(tree: Path) -> None:
    # docs/adopting.md: adapt the unit with a drop-in of this name.
    drop_in(tree, AGENT, "[Service]\nEnvironment=FIOCONFIG=off\n", name="local.conf")


def check_override(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    expect_unit(v, boot, "active", "exited", 0)
    ran = boot.file("/run/boot-test/fioconfig-check-in.json").exists()
    v.expect(not ran, "FIOCONFIG=off from the drop-in did not win over the default file's "
                      "FIOCONFIG=auto: fioconfig check-in ran")


def check_poweroff(boots: list[Boot], v: Verdict) -> None:
    first, second = boots
    if first.returncode is None:
        v.failures.append(f"first boot hung ({first.seconds:.0f} s)")
        return
    v.expect(not first.complete and first.returncode == 0,
             f"the container did not power off by itself after registering "
             f"(collector ran: {first.complete}, nspawn exit {first.returncode})")
    if not collected(second, v, "next boot"):
        return
    assert second.out is not None
    now = second.out.name.replace("-", "")
    before = [e for e in second.journal() if e.get("_BOOT_ID") != now]
    codes = exit_codes(before)
    v.expect(codes[-1:] == ["0"],
             f"next boot: the previous boot's LMP_EXIT_CODE in the journal: {codes}")


def boot_check(tree: Path) -> None:
    wants = tree / "etc/systemd/system/boot-complete.target.requires"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "systemd-boot-check-no-failures.service").symlink_to(
        "/lib/systemd/system/systemd-boot-check-no-failures.service")


def check_no_deadlock(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    expect_unit(v, boot, "active", "exited", 0)
    manager = boot.unit("")
    agent = boot.unit()
    start = int(manager.get("UserspaceTimestampMonotonic") or 0)
    active = int(agent.get("ActiveEnterTimestampMonotonic") or 0)
    v.expect(0 < active - start < 60e6,
             f"agent's unit active {(active - start) / 1e6:.1f} s after boot (limit 60 s)")
    for unit in ("multi-user.target", "aktualizr-lite.service"):
        v.expect(boot.unit(unit).get("ActiveState") == "active",
                 f"{unit} not active: {unit_state(boot.unit(unit))}")
    said = [message(e) for e in this_boot(boot) if e.get("_PID") == "1"
            and ("ordering cycle" in message(e) or "cyclic" in message(e))]
    v.expect(not said, "systemd refused a start: " + "; ".join(said))


def check_fioconfig(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    expect_unit(v, boot, "active", "exited", 0)
    config_arrived(boot, v)


def config_arrived(boot: Boot, v: Verdict) -> None:
    """The unit's fioconfig check-in ran, and the gateway's configuration is in the
    secrets dir, decrypted."""
    record = boot.file("/run/boot-test/fioconfig-check-in.json")
    if not v.expect(record.exists(), "fioconfig check-in did not run"):
        return
    seen = json.loads(record.read_text())
    v.expect("SOTA_DIR" not in seen["environ"], f"fioconfig saw SOTA_DIR={seen['sota_dir']}")
    v.expect(seen["secrets_dir_found"], f"fioconfig found no {seen['secrets_dir']}")
    arrived = boot.file(f"/run/secrets/{CONFIG_NAME}")
    v.expect(arrived.exists() and arrived.read_text() == CONFIG_TEXT,
             "the gateway's configuration is not in /run/secrets, decrypted, after the unit")
    served = [message(e) for e in of_unit(this_boot(boot), SERVER)
              if "gateway: GET /config from" in message(e)]
    v.expect(any(m.endswith("-> 200") for m in served),
             f"the kit's gateway served no configuration: {served}")


def config_dir(tree: Path) -> None:
    """The kit's gateway gets a configuration for every device (without it: 204)."""
    config = tree / "etc/boot-test/config"
    config.mkdir(parents=True, exist_ok=True)
    (config / CONFIG_NAME).write_text(CONFIG_TEXT)


def no_gateway(tree: Path) -> None:
    """fioconfig's own /etc/default/fioconfig sends it to a port where nothing listens."""
    (tree / "etc/default").mkdir(parents=True, exist_ok=True)
    (tree / "etc/default/fioconfig").write_text("CONFIG_URL=https://127.0.0.1:9/config\n")


def check_no_gateway(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    expect_unit(v, boot, "active", "exited", 0)
    registered(v, boot)
    said = [message(e) for e in of_unit(this_boot(boot), AGENT)]
    v.expect(any("is unreachable" in m for m in said),
             "the agent did not say the device gateway is unreachable")
    v.expect(not boot.file("/run/boot-test/fioconfig-check-in.json").exists(),
             "fioconfig ran (and would retry for a minute) though no gateway answers")
    v.expect(boot.unit("aktualizr-lite.service").get("ActiveState") == "active",
             "aktualizr-lite was held back")


def devprobe(tree: Path) -> None:
    probe = "/usr/local/sbin/boot-test-devprobe"
    drop_in(tree, AGENT, f"[Service]\nExecStartPre=-{probe} /run/boot-test/devices-unit.json "
                         f"{ALLOWED} {DENIED}\n")
    unit = tree / "etc/systemd/system/boot-test-devprobe.service"
    unit.write_text(f"[Service]\nType=oneshot\nExecStart={probe} "
                    f"/run/boot-test/devices-control.json {ALLOWED} {DENIED}\n"
                    "[Install]\nWantedBy=multi-user.target\n")
    (tree / "etc/systemd/system/multi-user.target.wants/boot-test-devprobe.service"
     ).symlink_to("/etc/systemd/system/boot-test-devprobe.service")


def check_sandbox(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    expect_unit(v, boot, "active", "exited", 0)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", boot.text("security.txt"))
    if v.expect(found is not None, "no exposure level in systemd-analyze security:\n"
                + boot.text("security.txt")[-500:]):
        assert found is not None
        level = float(found.group(1))
        v.expect(level <= SECURITY_MAX, f"systemd-analyze security: {level} > {SECURITY_MAX}")
        v.notes.append(f"systemd-analyze security: {level}")
    unit_file = boot.file("/run/boot-test/devices-unit.json")
    control_file = boot.file("/run/boot-test/devices-control.json")
    if not v.expect(unit_file.exists() and control_file.exists(), "the device probes did not run"):
        return
    inside, outside = json.loads(unit_file.read_text()), json.loads(control_file.read_text())
    v.expect(inside[ALLOWED] == "ok", f"the unit cannot open {ALLOWED}: {inside[ALLOWED]}")
    if outside[DENIED] != "ok":
        v.notes.append(f"DevicePolicy= not checked: {DENIED} cannot be opened even outside "
                       f"the unit ({outside[DENIED]})")
        return
    v.expect(inside[DENIED] == "EPERM",
             f"DevicePolicy=closed not enforced: the unit opened {DENIED} ({inside[DENIED]})")


def no_tmpfiles(tree: Path) -> None:
    (tree / "usr/lib/tmpfiles.d/lmp-autoreg.conf").unlink()


def check_no_tmpfiles(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    unit = boot.unit()
    v.expect(unit.get("Result") not in ("success", None), f"the unit did not fail: "
                                                         f"{unit_state(unit)}")
    entries = this_boot(boot)
    v.expect(not of_unit(entries, AGENT), "the agent ran without /var/sota")
    said = [message(e) for e in about_unit(entries, AGENT)]
    v.expect(unit.get("ExecMainStatus") == "226",
             f"want exit 226/NAMESPACE (the sandbox could not be set up); got {unit_state(unit)}")
    v.expect(any("/var/sota" in m and "No such file or directory" in m for m in said),
             f"no message of systemd says /var/sota is missing: {said}")


def hsm_mode(tree: Path) -> None:
    """HSM mode on SoftHSM2: the device's /etc/sota/hsm, and its token initialised early in
    the boot, as a factory's first boot or provisioning step would; a configuration from
    the gateway for the check-in, which fioconfig decrypts with the key on the token."""
    (tree / "etc/sota").mkdir(parents=True, exist_ok=True)
    (tree / "etc/sota/hsm").write_text(f"HSM_MODULE={HSM_MODULE}\nHSM_PIN={HSM_PIN}\n"
                                       f"HSM_SOPIN={HSM_SO_PIN}\n")
    unit = tree / "etc/systemd/system/boot-test-token.service"
    unit.write_text("[Unit]\nBefore=lmp-device-auto-register.service\n"
                    "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
                    "ExecStart=softhsm2-util --init-token --free --label aktualizr "
                    f"--pin {HSM_PIN} --so-pin {HSM_SO_PIN}\n"
                    "[Install]\nWantedBy=multi-user.target\n")
    (tree / "etc/systemd/system/multi-user.target.wants/boot-test-token.service"
     ).symlink_to("/etc/systemd/system/boot-test-token.service")
    config_dir(tree)


def check_hsm(boots: list[Boot], v: Verdict) -> None:
    (boot,) = boots
    if not collected(boot, v):
        return
    expect_unit(v, boot, "active", "exited", 0)
    names = boot.var_sota() or []
    missing = [n for n in ("sota.toml", "client.pem", "root.crt") if n not in names]
    v.expect(not missing, f"/var/sota lacks {', '.join(missing)} (has {names})")
    v.expect("pkey.pem" not in names, "a pkey.pem in /var/sota: the key is not on the token")
    config_arrived(boot, v)


SCENARIOS = [
    Scenario(1, "first boot", [BootSpec(settle())], check_first_boot),
    Scenario(2, "second boot", [
        BootSpec(settle(active=["aktualizr-lite.service"])),
        BootSpec(settle()),
        BootSpec(settle(), before=mask_aktualizr)], check_second_boot),
    Scenario(3, "server starts 20 s after boot", [BootSpec(settle(deadline=120))],
             check_late_server, setup=late_server(20)),
    Scenario(4, "outage longer than REGISTRATION_TIMEOUT", [BootSpec(settle(deadline=150))],
             check_outage, setup=outage),
    Scenario(5, "failed post-step", [BootSpec(settle(linger=5))], check_failed_post_step,
             variables={"LMP_AUTOREG_FIOCONFIG": "on"},
             setup=failing_fioconfig),
    Scenario(6, "a setting overridden by a drop-in", [BootSpec(settle())], check_override,
             setup=override),
    Scenario(7, "POWEROFF=1", [BootSpec({"until_deadline": True, "deadline": 90}),
                               BootSpec(settle())],
             check_poweroff, variables={"LMP_AUTOREG_POWEROFF": "1"}),
    Scenario(8, "no boot deadlock", [BootSpec(settle(
        active=["aktualizr-lite.service", "multi-user.target"], deadline=90))],
        check_no_deadlock, setup=boot_check),
    Scenario(9, "fioconfig check-in from the unit", [BootSpec(settle())], check_fioconfig,
             setup=config_dir),
    Scenario(10, "the sandbox", [BootSpec(settle("boot-test-devprobe.service"), bpf=True)],
             check_sandbox, setup=devprobe),
    Scenario(11, "no tmpfiles entry", [BootSpec({"failed": [AGENT], "deadline": 60})],
             check_no_tmpfiles, setup=no_tmpfiles),
    Scenario(12, "no device gateway answers", [BootSpec(settle(
        active=["aktualizr-lite.service"]))], check_no_gateway, setup=no_gateway),
    Scenario(13, "first boot in HSM mode (SoftHSM2)", [BootSpec(settle())], check_hsm,
             setup=hsm_mode, hsm=True),
]
