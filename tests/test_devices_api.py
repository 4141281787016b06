"""The kit's devices API (lmp_autoreg.testing.devices_api), served by the registration
server on 127.0.0.1 and spoken to over real HTTP, with certificates of the kit's CA."""

import json
import uuid as uuidlib

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from lmp_autoreg.testing import RegistrationServer, ThrowawayCA
from lmp_autoreg.testing.devices_api import CONFLICT, STORE, Device

from conftest import any_text

TOKEN = "api-test-token"


def certificate(ca: ThrowawayCA, uuid: str | None = None) -> tuple[str, str]:
    """A device certificate of ``ca`` for a new key: (uuid, PEM)."""
    uuid = uuid or str(uuidlib.uuid4())
    return uuid, ca.cert_for_other_key(uuid, ou="acme")


@pytest.fixture(scope="module")
def server():
    with RegistrationServer(devices_api=True, api_token=TOKEN) as served:
        yield served


def put(server, body, token: str | None = TOKEN, **kw):
    headers = {"OSF-TOKEN": token} if token is not None else {}
    return requests.put(server.api_url, json=body, headers=headers, timeout=30, **kw)


def get(server, path: str = "", token: str | None = TOKEN):
    headers = {"OSF-TOKEN": token} if token is not None else {}
    return requests.get(server.api_url + path, headers=headers, timeout=30)


def test_put_creates_the_device_with_its_name_and_group_then_409(server):
    uuid, pem = certificate(server.ca)
    created = put(server, {"client.pem": pem, "name": "board-7", "group": "line-1"})
    assert created.status_code == 201
    serial = format(uuidlib.UUID(uuid).int, "x")
    assert server.devices_api.device(uuid) == Device(uuid, "board-7", "line-1", serial)
    again = put(server, {"client.pem": pem})
    assert again.status_code == 409 and again.json() == {"message": CONFLICT}
    assert server.devices_api.device(uuid).name == "board-7"  # the first one stands


def test_without_a_name_or_group_the_name_is_the_uuid(server):
    uuid, pem = certificate(server.ca)
    assert put(server, {"client.pem": pem, "group": None}).status_code == 201
    assert server.devices_api.group_of(uuid) is None
    assert server.devices_api.device(uuid).name == uuid


def test_both_gets_list_and_show_the_devices(server):
    uuid, pem = certificate(server.ca)
    assert put(server, {"client.pem": pem, "group": "line-2"}).status_code == 201
    listed = get(server)
    assert listed.status_code == 200 and listed.headers["Content-Type"] == "application/json"
    shown = {d["uuid"]: d for d in listed.json()["devices"]}
    assert shown[uuid]["device-group"] == "line-2" and listed.json()["total"] == len(shown)
    one = get(server, f"{uuid}/")
    assert one.status_code == 200
    assert one.json() == {"uuid": uuid, "name": uuid, "device-group": "line-2",
                          "group": {"name": "line-2"},
                          "serial": format(uuidlib.UUID(uuid).int, "x")}
    assert get(server, f"{uuidlib.uuid4()}/").status_code == 404
    assert get(server, f"{uuid}/more/").status_code == 404


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_401_without_the_token_and_403_with_another(server, method):
    uuid, pem = certificate(server.ca)
    for token, status in ((None, 401), ("", 401), ("wrong", 403), (TOKEN + "x", 403)):
        headers = {"OSF-TOKEN": token} if token is not None else {}
        answer = requests.request(method, server.api_url, json={"client.pem": pem},
                                  headers=headers, timeout=30)
        assert answer.status_code == status, token
        assert "message" in answer.json()
    assert server.devices_api.device(uuid) is None


@pytest.mark.parametrize("body, says", [
    (b"not json", "not JSON"),
    (b"[1]", "not a JSON object"),
    (b"{}", "client.pem"),
    (b'{"client.pem": 5}', "client.pem"),
    (b'{"client.pem": "-----BEGIN CERTIFICATE-----\\nxx\\n"}', "Invalid client.pem"),
])
def test_a_body_it_does_not_take_gets_400_and_a_message(server, body, says):
    answer = requests.put(server.api_url, data=body, headers={"OSF-TOKEN": TOKEN}, timeout=30)
    assert answer.status_code == 400 and says in answer.json()["message"]


@pytest.mark.parametrize("field", ["name", "group"])
def test_a_name_or_group_that_is_not_text_gets_400(server, field):
    uuid, pem = certificate(server.ca)
    answer = put(server, {"client.pem": pem, field: ["x"]})
    assert answer.status_code == 400 and field in answer.json()["message"]
    assert server.devices_api.device(uuid) is None


def test_a_certificate_of_another_ca_gets_400(server):
    uuid, pem = certificate(ThrowawayCA("acme"))
    answer = put(server, {"client.pem": pem})
    assert answer.status_code == 400 and "device CA" in answer.json()["message"]
    assert server.devices_api.device(uuid) is None


def test_other_methods_and_paths_get_405(server):
    assert requests.post(server.api_url, headers={"OSF-TOKEN": TOKEN},
                         timeout=30).status_code == 405
    assert requests.put(server.api_url + "x/", headers={"OSF-TOKEN": TOKEN},
                        timeout=30).status_code == 405


def test_scripted_answers_come_first(server):
    server.devices_api.script((503, "down"))
    assert get(server).status_code == 503
    assert get(server).status_code == 200


def test_a_server_restarted_from_its_state_dir_keeps_the_devices(tmp_path):
    with RegistrationServer(devices_api=True, api_token=TOKEN, state_dir=tmp_path) as first:
        uuid, pem = certificate(first.ca)
        assert put(first, {"client.pem": pem, "group": "g"}).status_code == 201
    assert json.loads((tmp_path / STORE).read_text())["devices"][0]["uuid"] == uuid
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with RegistrationServer(devices_api=True, api_token=TOKEN, state_dir=tmp_path) as second:
        assert second.devices_api.group_of(uuid) == "g"
        assert put(second, {"client.pem": pem}).status_code == 409
        assert get(second, f"{uuid}/").json()["device-group"] == "g"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | any_text(20),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(any_text(10), inner, max_size=3), max_leaves=8)
FIELDS = st.fixed_dictionaries({}, optional={"client.pem": JSON, "name": JSON, "group": JSON})


@pytest.mark.parametrize("saved", ["", "[]", '{"devices": [{"uuid": "u"}]}'])
def test_a_store_that_holds_no_devices_list_is_refused_not_overwritten(tmp_path, saved):
    (tmp_path / STORE).write_text(saved)
    with pytest.raises(ValueError, match="does not hold a list of devices"):
        RegistrationServer(devices_api=True, state_dir=tmp_path)
    assert (tmp_path / STORE).read_text() == saved


def dumps(value) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                       max_size=20).filter(lambda v: v == v.strip())


@pytest.mark.props
@given(body=st.one_of(st.binary(max_size=200), JSON.map(dumps), FIELDS.map(dumps)),
       header=st.one_of(st.just(("OSF-TOKEN", TOKEN)),
                        st.tuples(st.sampled_from(["OSF-TOKEN", "osf-token", "X-Other"]),
                                  HEADER_VALUE)),
       method=st.sampled_from(["GET", "PUT", "POST", "HEAD"]),
       path=st.sampled_from(["", "x/", f"{uuidlib.UUID(int=1)}/", "?page=2"]))
def test_any_body_and_header_gets_a_documented_answer(server, body, header, method, path):
    """Whatever is sent, the answer is 200, 201, 401, 403, 404, 405 or 409 as documented,
    or 400 with a message: never a 500 or a traceback."""
    answer = requests.request(method, server.api_url + path, data=body,
                              headers=dict([header]), timeout=30)
    authorized = header[0].lower() == "osf-token" and header[1] == TOKEN
    if not header[0].lower() == "osf-token" or not header[1].strip():
        assert answer.status_code == 401
    elif not authorized:
        assert answer.status_code == 403
    else:
        assert answer.status_code in {200, 400, 404, 405}
    if method != "HEAD":
        assert set(answer.json()) in ({"message"}, {"devices", "total", "next"},
                                      {"uuid", "name", "device-group", "group", "serial"})
