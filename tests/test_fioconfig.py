"""The kit's stand-in fioconfig (lmp_autoreg.testing.fioconfig) against the kit's gateway,
in-process: what the real fioconfig 638424812372 did in the same cases, run by hand."""

import json
import os

import pytest
from test_gateway import UUID, make_device

from lmp_autoreg.testing import ThrowawayCA
from lmp_autoreg.testing.fioconfig import main
from lmp_autoreg.testing.gateway import DeviceGateway
from lmp_autoreg.testing.server import sota_toml


@pytest.fixture
def device(tmp_path, monkeypatch):
    """A device of the kit's CA whose sota.toml names a running gateway."""
    ca = ThrowawayCA("acme")
    make_device(ca, UUID, tmp_path)
    sota = tmp_path / "sota"
    sota.mkdir()
    (sota / "root.crt").write_text(ca.cert_pem)
    os.replace(tmp_path / f"{UUID}.pem", sota / "client.pem")
    os.replace(tmp_path / f"{UUID}.key", sota / "pkey.pem")
    with DeviceGateway(ca) as gateway:
        (sota / "sota.toml").write_text(sota_toml("hw", sota_dir=str(sota), gateway=gateway.url))
        monkeypatch.setenv("SECRETS_DIR", str(tmp_path / "secrets"))
        monkeypatch.delenv("CONFIG_URL", raising=False)
        yield gateway, sota, tmp_path / "secrets"


def check_in(sota) -> int:
    return main(["--config", str(sota / "sota.toml"), "check-in"], retry_delays=[])


def test_without_its_secrets_dir_it_refuses_and_writes_nothing(device, capsys):
    gateway, sota, secrets = device
    gateway.set_config(None, {"a": "b"})
    assert check_in(sota) == 1
    assert f"ERROR stat {secrets}: no such file or directory" in capsys.readouterr().err
    assert not secrets.exists() and not (sota / "config.encrypted").exists()


def test_then_with_it_the_files_then_304(device, capsys):
    gateway, sota, secrets = device
    gateway.set_config(None, {"a": "b"})
    secrets.mkdir(mode=0o750)
    assert check_in(sota) == 0
    assert (secrets / "a").read_text() == "b"
    stored = json.loads((sota / "config.encrypted").read_text())
    assert stored["a"]["Unencrypted"] is False and stored["a"]["Value"] != "b"
    assert check_in(sota) == 0
    assert "Config on server has not changed" in capsys.readouterr().err
    assert "If-Modified-Since" in gateway.requests[-1].request.headers
