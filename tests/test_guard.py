"""The start-up guard: where the sota dir is, and whether the device is registered."""

import pytest

from lmp_autoreg import guard, paths
from lmp_autoreg.errors import AlreadyRegistered, ConfigError
from lmp_autoreg.settings import resolve_paths


def test_same_defaults_as_the_device_layout():
    assert guard.DEFAULT_SOTA_DIR == str(paths.DEFAULT_SOTA_DIR)
    assert guard.DEFAULTS_FILE == str(paths.DEFAULTS_FILE)


def test_sota_dir_comes_from_the_first_place_that_sets_it(tmp_path):
    root = str(tmp_path)
    defaults = tmp_path / "etc/default/lmp-device-auto-register"
    assert guard.locate({"sysroot": root}, {}) == (root, "/var/sota")
    defaults.parent.mkdir(parents=True)
    defaults.write_text('SOTA_DIR="/data/from-file"\n')
    assert guard.locate({"sysroot": root}, {}) == (root, "/data/from-file")
    assert guard.locate({"sysroot": root}, {"SOTA_DIR": "/data/env"}) == (root, "/data/env")
    cli = {"sysroot": root, "sota_dir": "/data/cli"}
    assert guard.locate(cli, {"SOTA_DIR": "/data/env"}) == (root, "/data/cli")
    # Empty values count as unset, at every level.
    assert guard.locate({"sysroot": root, "sota_dir": ""}, {"SOTA_DIR": ""})[1] == "/data/from-file"
    assert guard.host_path(*guard.locate(cli, {})) == f"{root}/data/cli"
    assert resolve_paths(cli, {}).sota == tmp_path / "data/cli"


def test_bad_places_are_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"sota dir from \$SOTA_DIR is invalid: 'rel/sota'"):
        guard.locate({"sysroot": str(tmp_path)}, {"SOTA_DIR": "rel/sota"})
    with pytest.raises(ConfigError, match="--sysroot .*/nonesuch is not a directory"):
        guard.locate({"sysroot": str(tmp_path / "nonesuch")}, {})


def test_check_names_the_uuid_or_does_without(tmp_path, registration_server):
    guard.check_not_registered(tmp_path)  # nothing there: not registered
    (tmp_path / "sota.toml").write_text("[tls]\n")
    (tmp_path / "client.pem").write_text("not a certificate\n")
    with pytest.raises(AlreadyRegistered) as info:
        guard.check_not_registered(str(tmp_path))
    assert info.value.uuid is None and ", uuid" not in str(info.value)
    assert guard.registered_uuid(tmp_path) is None
    ca = registration_server.ca
    (tmp_path / "client.pem").write_text(ca.cert_pem)
    with pytest.raises(AlreadyRegistered, match=r"uuid Factory-CA\): nothing to do"):
        guard.check_not_registered(tmp_path)
    (tmp_path / "client.pem").unlink()
    assert guard.registered_uuid(tmp_path) is None
