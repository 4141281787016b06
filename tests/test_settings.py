"""Settings sources and their precedence (docs/spec.md section 3), on a pyfakefs device."""

from pathlib import Path, PurePosixPath

import pytest

from lmp_autoreg.errors import ConfigError
from lmp_autoreg.settings import DEFAULT_DEVICE_API, list_apps, read_env_file, resolve
from lmp_autoreg.testing.device import populate

DEFAULTS = Path("/etc/default/lmp-device-auto-register")


def write(path: str | Path, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def test_device_files_alone(fake_device):
    s = resolve({}, {})
    assert (s.factory, s.tag, s.hardware_id) == ("acme", "main", "intel-corei7-64")
    assert s.device_api == DEFAULT_DEVICE_API and s.production is False
    assert s.apps == ("app1", "app2") and s.name is None and s.uuid is None
    assert s.token == "not-a-real-token" and s.token_header == "OSF-TOKEN"
    assert s.paths.sota == Path("/var/sota") and s.start == ("aktualizr-lite", "fioconfig")
    assert s.timeout == 300 and s.backend == "native" and s.fioconfig == "auto"
    assert "not-a-real-token" not in repr(s)


@pytest.mark.parametrize(
    ("flag", "env", "attr", "file_value"),
    [
        ("factory", "DEVICE_FACTORY", "factory", "acme"),
        ("hwid", "HARDWARE_ID", "hardware_id", "intel-corei7-64"),
        ("device_api", "DEVICE_API", "device_api", DEFAULT_DEVICE_API),
        ("device_group", "DEVICE_GROUP", "device_group", None),
    ],
)
def test_cli_beats_env_beats_defaults_file_beats_device(fake_device, flag, env, attr, file_value):
    assert getattr(resolve({}, {}), attr) == file_value
    write(DEFAULTS, f'# comment\n{env}="http://localhost/from-file/"\n')
    assert getattr(resolve({}, {}), attr) == "http://localhost/from-file/"
    from_env = {env: "http://localhost/from-env/"}
    assert getattr(resolve({}, from_env), attr) == "http://localhost/from-env/"
    cli = {flag: "http://localhost/from-cli/"}
    assert getattr(resolve(cli, from_env), attr) == "http://localhost/from-cli/"


def test_a_drop_ins_environment_beats_the_default_file(fake_device):
    # The unit has no EnvironmentFile=: a drop-in's Environment= reaches the agent as its
    # environment, which beats what the image's default file says (docs/adopting.md).
    write(DEFAULTS, "START_SERVICES=aktualizr-lite\nFIOCONFIG=off\nRESTORABLE_APPS=app1\n")
    s = resolve({}, {})
    assert (s.start, s.fioconfig, s.restorable_apps) == (("aktualizr-lite",), "off", "app1")
    s = resolve({}, {"START_SERVICES": "fioconfig", "FIOCONFIG": "on", "RESTORABLE_APPS": ""})
    assert (s.start, s.fioconfig, s.restorable_apps) == (("fioconfig",), "on", "")


def test_tag_from_sota_tag_then_os_release(fake_device):
    write("/etc/sota/tag", "devel\nignored second line\n")
    assert resolve({}, {}).tag == "devel"
    Path("/etc/sota/tag").unlink()
    assert resolve({}, {}).tag == "main"  # LMP_FACTORY_TAG in os-release
    assert resolve({"tag": "cli"}, {}).tag == "cli"


def test_os_release_quotes_are_stripped(fake_device):
    write("/etc/os-release", "ID=lmp\nLMP_FACTORY='single'\nLMP_MACHINE=\"double\"\n"
          "LMP_FACTORY_TAG=bare\n")
    s = resolve({}, {})
    assert (s.factory, s.hardware_id) == ("single", "double")


def test_missing_settings_name_every_place(fake_device):
    write("/etc/os-release", "ID=lmp\n")
    Path("/etc/sota/tag").unlink()
    with pytest.raises(ConfigError, match=r"factory is not set: looked in --factory, "
                       r"\$DEVICE_FACTORY, DEVICE_FACTORY in /etc/default/lmp-device-auto-register,"
                       r" LMP_FACTORY in /etc/os-release"):
        resolve({}, {})
    with pytest.raises(ConfigError, match=r"tag is not set: looked in --tag, /etc/sota/tag, "
                       "LMP_FACTORY_TAG in /etc/os-release"):
        resolve({"factory": "f"}, {})
    with pytest.raises(ConfigError, match="hardware id is not set: .*LMP_MACHINE"):
        resolve({"factory": "f", "tag": "t"}, {})


def test_production_set_even_empty(fake_device):
    assert resolve({}, {"PRODUCTION": ""}).production is True
    write(DEFAULTS, "PRODUCTION=\n")
    assert resolve({}, {}).production is True
    assert resolve({"production": False}, {"PRODUCTION": "1"}).production is False


def test_name_from_hostname(fake_device):
    assert resolve({}, {"USE_HOSTNAME": "1"}).name == "device-1"
    assert resolve({}, {"USE_HOSTNAME": ""}).name is None
    assert resolve({"name": "cli-name"}, {"USE_HOSTNAME": "1"}).name == "cli-name"
    Path("/etc/hostname").unlink()
    with pytest.raises(ConfigError, match="/etc/hostname"):
        resolve({}, {"USE_HOSTNAME": "1"})


def test_uuid_validated_and_lowered(fake_device):
    uuid = "0A1B2C3D-0000-4000-8000-00000000000F"
    assert resolve({"uuid": uuid}, {}).uuid == uuid.lower()
    with pytest.raises(ConfigError, match="uuid"):
        resolve({"uuid": "1234"}, {})


def test_apps_sources(fake_device):
    Path("/var/sota/compose-apps/.hidden").mkdir()
    Path("/var/sota/compose-apps/README").write_text("a plain file")
    Path("/var/sota/compose-apps/0first").mkdir()
    assert resolve({}, {}).apps == ("0first", "app1", "app2")
    assert resolve({}, {"APPS": "x, y"}).apps == ("x", "y")
    assert resolve({"apps": "z"}, {"APPS": "x"}).apps == ("z",)
    assert resolve({"apps": " , "}, {}).apps == ("0first", "app1", "app2")  # no names: unset
    for app in ("0first", "app1", "app2"):
        for entry in Path("/var/sota/compose-apps", app).iterdir():
            entry.unlink()
        Path("/var/sota/compose-apps", app).rmdir()
    assert resolve({}, {}).apps is None  # no apps found: all apps


def test_restorable_apps_sources(fake_device):
    Path("/var/sota/reset-apps").mkdir()  # changes nothing
    assert resolve({}, {}).restorable_apps == " "  # on, every app: the tool's -A default
    assert resolve({"restorable_apps": "a, b"}, {}).restorable_apps == "a,b"
    assert resolve({"restorable_apps": ""}, {"RESTORABLE_APPS": "a"}).restorable_apps == ""
    assert resolve({}, {"RESTORABLE_APPS": ""}).restorable_apps == ""  # set but empty: off
    assert resolve({}, {"RESTORABLE_APPS": "c"}).restorable_apps == "c"
    assert resolve({"restorable_apps": " , "}, {}).restorable_apps == " "  # no names: on
    write("/etc/default/lmp-device-auto-register", "RESTORABLE_APPS=\n")
    assert resolve({}, {}).restorable_apps == ""


def test_token_sources(fake_device):
    write("/root/cli-token", "cli-token\n")
    write("/root/env-token", "env-token\n")
    assert resolve({"token_file": "/root/cli-token"}, {"TOKEN_FILE": "/root/env-token"}).token \
        == "cli-token"
    assert resolve({}, {"TOKEN_FILE": "/root/env-token"}).token == "env-token"
    with pytest.raises(ConfigError, match="/root/missing"):
        resolve({"token_file": "/root/missing"}, {})
    Path("/etc/lmp-device-register-token").unlink()
    with pytest.raises(ConfigError, match="API token is not set"):
        resolve({}, {})
    assert resolve({}, {"PRODUCTION": "1"}).token is None
    assert resolve({"api_token_header": "X-Token"}, {"TOKEN_FILE": "/root/env-token"}) \
        .token_header == "X-Token"


def test_sysroot_resolves_device_paths_only(fake_device):
    populate("/mnt/image", {
        "etc": {"os-release": 'LMP_FACTORY="imagefactory"\nLMP_MACHINE=rpi\n',
                "sota": {"tag": "prod\n"},
                "lmp-device-register-token": "image-token\n"},
        "data": {"sota": {"compose-apps": {"web": None}}},
    })
    write("/root/host-token", "host-token\n")
    s = resolve({"sysroot": "/mnt/image"}, {"SOTA_DIR": "/data/sota"})
    assert (s.factory, s.hardware_id, s.tag) == ("imagefactory", "rpi", "prod")
    assert s.token == "image-token" and s.apps == ("web",)
    assert s.paths.sota == Path("/mnt/image/data/sota")
    assert s.paths.sota_device == PurePosixPath("/data/sota")
    # A token file a person names is a path on this machine, not in the image.
    s = resolve({"sysroot": "/mnt/image", "token_file": "/root/host-token"}, {})
    assert s.token == "host-token"
    with pytest.raises(ConfigError, match="mounted image"):
        resolve({"sysroot": "/mnt/image", "backend": "lmp-device-register"}, {})


def test_hsm_all_or_nothing(fake_device):
    assert resolve({}, {}).hsm is None
    write("/etc/sota/hsm", "HSM_MODULE=/usr/lib/softhsm/libsofthsm2.so\nHSM_PIN=87654321\n")
    with pytest.raises(ConfigError, match="partial HSM.*--hsm-so-pin"):
        resolve({}, {})
    hsm = resolve({"hsm_so_pin": "12345678"}, {}).hsm
    assert hsm is not None and hsm.module.endswith("libsofthsm2.so") and hsm.pin == "87654321"
    assert "87654321" not in repr(hsm)


@pytest.mark.parametrize(
    ("cli", "env", "match"),
    [
        ({"device_api": "ftp://x"}, {}, "registration URL"),
        ({"timeout": "0"}, {}, "timeout"),
        ({}, {"REGISTRATION_TIMEOUT": "soon"}, "timeout"),
        ({}, {"BACKEND": "magic"}, "backend"),
        ({}, {"FIOCONFIG": "maybe"}, "fioconfig"),
        ({"cacert": "/nope.pem"}, {}, "CA bundle"),
        ({"sota_dir": "relative"}, {}, "sota dir"),
        ({"sysroot": "/does/not/exist"}, {}, "sysroot"),
    ],
)
def test_invalid_values_exit_2(fake_device, cli, env, match):
    with pytest.raises(ConfigError, match=match) as raised:
        resolve(cli, env)
    assert raised.value.exit_code == 2


def test_start_services(fake_device):
    assert resolve({"no_start": True}, {}).start == ()
    assert resolve({"start": "fioconfig"}, {}).start == ("fioconfig",)
    assert resolve({}, {"START_SERVICES": ""}).start == ()


def test_read_env_file_and_list_apps(fs):
    write("/f", "export A=1\n# B=2\n\nC='x y'\nbroken line\n")
    assert read_env_file(Path("/f")) == {"A": "1", "C": "x y"}
    assert read_env_file(Path("/missing")) == {}
    assert list_apps(Path("/missing")) == ()


def test_links_in_a_mounted_image_stay_inside_it(fake_device):
    populate("/mnt/image", {
        "usr": {"lib": {"os-release": 'LMP_FACTORY="inside"\nLMP_MACHINE=rpi\n'}},
        "etc": {"sota": {"tag": "prod\n"}, "lmp-device-register-token": "image-token\n"},
        "data": {"sota": {"compose-apps": {"web": None}}},
        "var": None,
    })
    # Absolute links, as an image has them: they mean /mnt/image/..., never this machine's.
    Path("/mnt/image/etc/os-release").symlink_to("/usr/lib/os-release")
    Path("/mnt/image/var/sota").symlink_to("/data/sota")
    write("/usr/lib/os-release", 'LMP_FACTORY="this-machine"\n')
    s = resolve({"sysroot": "/mnt/image"}, {})
    assert s.factory == "inside" and s.apps == ("web",)
    assert s.paths.sota == Path("/mnt/image/data/sota")
    assert s.paths.sota_device == PurePosixPath("/var/sota")
    # A relative link climbing out of the image stops at its root, as on the device.
    Path("/mnt/image/etc/os-release").unlink()
    Path("/mnt/image/etc/os-release").symlink_to("../../../../usr/lib/os-release")
    assert resolve({"sysroot": "/mnt/image"}, {}).factory == "inside"


def test_a_link_loop_in_an_image_is_a_config_error(fake_device):
    populate("/mnt/image", {"etc": None})
    Path("/mnt/image/etc/os-release").symlink_to("/etc/os-release")
    with pytest.raises(ConfigError, match="too many symbolic links"):
        resolve({"sysroot": "/mnt/image"}, {})


def test_sota_dir_with_dot_dot_is_refused(fake_device):
    with pytest.raises(ConfigError, match="without '..'"):
        resolve({"sota_dir": "/var/../../tmp/escaped"}, {})


def test_paths_in_the_images_default_file_are_device_paths(fake_device):
    populate("/mnt/image", {
        "etc": {"os-release": 'LMP_FACTORY="f"\nLMP_MACHINE=m\nLMP_FACTORY_TAG=t\n',
                "default": {"lmp-device-auto-register":
                            "TOKEN_FILE=/etc/my-token\nCACERT=/etc/ssl/factory-ca.pem\n"},
                "my-token": "image-token\n", "ssl": {"factory-ca.pem": "a CA\n"}},
    })
    write("/etc/my-token", "this-machines-token\n")
    s = resolve({"sysroot": "/mnt/image"}, {})
    assert s.token == "image-token" and s.token_place == "/mnt/image/etc/my-token"
    assert s.cacert == "/mnt/image/etc/ssl/factory-ca.pem"
    # From the real environment, the same names are paths on this machine.
    s = resolve({"sysroot": "/mnt/image"}, {"TOKEN_FILE": "/etc/my-token"})
    assert s.token == "this-machines-token"
