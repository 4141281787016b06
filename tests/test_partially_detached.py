"""A partially detached registration server (RegistrationServer(partially_detached=True)):
/sign creates each device in the devices API before it answers, as factory-registration-ref
does with an API token, over real HTTP on 127.0.0.1."""

import json
import uuid as uuidlib

import pytest
import requests
from test_testing_kit import make_body, post

from lmp_autoreg.testing import RegistrationServer
from lmp_autoreg.testing.devices_api import CONFLICT, Device
from lmp_autoreg.testing.upstream import WAITS

from conftest import device_args, run_cli

TOKEN = "api-test-token"


def puts(server: RegistrationServer):
    return [r for r in server.requests if r.method == "PUT"]


def gaps(recorded) -> list[float]:
    return [b.time - a.time for a, b in zip(recorded, recorded[1:], strict=False)]


@pytest.fixture
def server():
    with RegistrationServer(partially_detached=True, device_group="line-1",
                            api_token=TOKEN) as served:
        yield served


def test_sign_creates_the_device_in_its_group_before_answering(server):
    uuid = str(uuidlib.uuid4())
    answer = post(server, make_body(uuid, name="board-1"))
    assert answer.status_code == 201
    [put] = puts(server)
    assert put.path == "/ota/devices/" and put.headers["OSF-TOKEN"] == TOKEN
    assert put.json == {"client.pem": answer.json()["client.pem"], "group": "line-1",
                        "name": "board-1"}
    assert server.devices_api.devices() == [
        Device(uuid, "board-1", "line-1", format(uuidlib.UUID(uuid).int, "x"))]
    assert server.registered[uuid] == answer.json()["client.pem"]


def test_without_a_group_or_a_name_none_is_sent():
    with RegistrationServer(partially_detached=True) as server:
        body = make_body()
        del body["name"]
        assert post(server, body).status_code == 201
        [put] = puts(server)
        assert set(put.json) == {"client.pem"} and put.headers["OSF-TOKEN"] == server.api_token
        [device] = server.devices_api.devices()
        assert device.group is None and device.name == device.uuid


def test_an_api_that_fails_twice_is_tried_again_after_the_reference_waits(server):
    server.devices_api.script((503, "down"), (500, "broken"))
    uuid = str(uuidlib.uuid4())
    assert post(server, make_body(uuid)).status_code == 201
    tried = puts(server)
    assert len(tried) == 3 and server.devices_api.group_of(uuid) == "line-1"
    assert all(g >= w for g, w in zip(gaps(tried), WAITS[:2], strict=True))


def test_an_api_that_keeps_failing_gives_the_device_a_500_with_its_last_words(server):
    server.devices_api.script((503, "down"), (503, "down"), (502, "gateway"),
                              (500, "still broken"))
    uuid = str(uuidlib.uuid4())
    answer = post(server, make_body(uuid))
    assert (answer.status_code, answer.text) == (500, "still broken")
    tried = puts(server)
    assert len(tried) == 4 and all(g >= w for g, w in zip(gaps(tried), WAITS, strict=True))
    assert uuid not in server.registered and server.devices_api.devices() == []


def test_a_409_from_the_api_is_passed_to_the_device_at_once(server):
    uuid = str(uuidlib.uuid4())
    assert post(server, make_body(uuid)).status_code == 201
    again = post(server, make_body(uuid))  # the same uuid, another key
    assert again.status_code == 409
    assert json.loads(again.text) == {"message": CONFLICT}
    assert len(puts(server)) == 2  # no retry after a 409


def test_an_upstream_api_gets_the_devices(tmp_path):
    """The factory's server creates its devices in another API (the Foundries one, which
    knows the factory's device CA: here the same state directory)."""
    with RegistrationServer(devices_api=True, api_token=TOKEN, state_dir=tmp_path) as api, \
            RegistrationServer(partially_detached=True, device_group="g", api_token=TOKEN,
                               upstream_api=api.api_url, state_dir=tmp_path) as server:
        assert server.devices_api is None
        uuid = str(uuidlib.uuid4())
        assert post(server, make_body(uuid)).status_code == 201
        assert api.devices_api.group_of(uuid) == "g"
        assert post(server, make_body(uuid)).status_code == 409


def test_an_unreachable_api_is_a_failure_tried_again(tmp_path):
    with RegistrationServer(devices_api=True, api_token=TOKEN) as gone:
        url = gone.api_url
    with RegistrationServer(partially_detached=True, api_token=TOKEN, upstream_api=url) as server:
        answer = post(server, make_body())
        assert answer.status_code == 500 and "unreachable" in answer.text


def test_an_upstream_api_needs_a_token():
    with pytest.raises(ValueError, match="token"):
        RegistrationServer(partially_detached=True, upstream_api="http://127.0.0.1:1/")


def test_over_https_the_server_trusts_its_own_api():
    with RegistrationServer(tls=True, partially_detached=True) as server:
        answer = post(server, make_body(), verify=str(server.ca_file))
        assert answer.status_code == 201 and len(server.devices_api.devices()) == 1


@pytest.mark.registration_server(partially_detached=True, device_group="line-1")
def test_the_agent_registers_once_then_a_second_time_gets_the_apis_409(
        device_root, registration_server):
    """The agent's view: the first registration creates the device; registering the same
    uuid again ends in the API's 409, exit 4 (the agent's side of a 409: docs/spec.md)."""
    first = run_cli(*device_args(device_root, registration_server, "--json", "--production"))
    assert first.returncode == 0, first.stderr
    uuid = first.json["uuid"]
    assert registration_server.devices_api.group_of(uuid) == "line-1"
    again = run_cli(*device_args(device_root, registration_server, "--json", "--production",
                                 "--force", "--uuid", uuid))
    assert again.returncode == 4, again.stderr
    assert again.json["error"]["message"].endswith(f"(HTTP 409): {CONFLICT}")
    shown = requests.get(registration_server.api_url + f"{uuid}/", timeout=30,
                         headers={"OSF-TOKEN": registration_server.api_token})
    assert shown.json()["device-group"] == "line-1"
