"""Warning page addresses of their own for devices behind a router: the slot, the collisions, the config."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest

from blocklists.catalog import load_catalog
from resolver.shared.config import Config, load_config
from resolver.shared.dns import text_to_name
from resolver.shared.errors import ConfigError
from resolver.shared.page_pool import PagePool, slot
from resolver.shared.policy.model import Site, parse_site

pytestmark = pytest.mark.unit
CATALOG = load_catalog()
NAME = text_to_name("malware.example")


def site(devices: dict[str, dict]) -> Site:
    return parse_site({"id": "home", "networks": ["192.0.2.0/24"], "devices": devices}, CATALOG)


def mac(number: int) -> dict[str, list[str]]:
    return {"macs": [f"02:00:00:00:00:{number:02x}"]}


def test_the_slot_is_the_first_eight_bytes_of_blake2b_modulo_the_pool():
    digest = hashlib.blake2b(b"home\x00laptop\x00malware.example").digest()
    assert slot("home", "laptop", "malware.example", 8) == int.from_bytes(digest[:8], "big") % 8
    assert slot("home", "laptop", "malware.example", 1) == 0
    # Every part counts, and the slots spread over the pool.
    assert len({slot("home", f"device{n}", "malware.example", 256) for n in range(64)}) > 40
    assert len({slot(f"site{n}", "laptop", "malware.example", 256) for n in range(64)}) > 40
    assert len({slot("home", "laptop", f"name{n}.example", 256) for n in range(64)}) > 40


def test_pool_addresses_are_counted_per_version_in_the_configured_order():
    pool = PagePool(("192.0.2.8/30", "2001:db8::/126", "198.51.100.0/31"))
    assert pool.addresses()[:5] == ["192.0.2.8", "192.0.2.9", "192.0.2.10", "192.0.2.11", "2001:db8::"]
    assert pool.place("192.0.2.10") == (4, 2)
    assert pool.place("198.51.100.1") == (4, 5)
    assert pool.place("2001:db8::3") == (6, 3)
    assert pool.place("2001:db8:0:0::3%lo") == (6, 3)
    assert pool.place("192.0.2.12") is None and pool.place("nonsense") is None
    assert not PagePool(())


def test_each_device_gets_its_own_address_and_the_page_finds_it_back():
    pool = PagePool(("192.0.2.0/29",))
    home = site({"laptop": mac(1), "phone": mac(2), "printer": {"addresses": ["192.0.2.200"]}})
    laptop, phone, printer = (home.devices[d] for d in ("laptop", "phone", "printer"))
    assert slot("home", "laptop", "malware.example", 8) != slot("home", "phone", "malware.example", 8)
    mine = pool.address(home, laptop, NAME, 4)
    theirs = pool.address(home, phone, NAME, 4)
    assert mine and theirs and mine != theirs
    assert pool.address(home, printer, NAME, 4) is None  # known by its address only
    assert pool.address(home, laptop, NAME, 6) is None  # no IPv6 pool: the shared page
    for device, packed in ((laptop, mine), (phone, theirs)):
        place = pool.place(str(ipaddress.ip_address(packed)))
        assert place is not None
        assert pool.devices_at(home, NAME, place) == [device]


def test_two_devices_on_one_slot_both_get_the_shared_page_and_the_page_names_neither():
    pool = PagePool(("192.0.2.0/29",))
    # laptop and tv share slot 0 for this name in site "home"; phone has slot 4
    assert slot("home", "laptop", "malware.example", 8) == slot("home", "tv", "malware.example", 8) == 0
    assert slot("home", "phone", "malware.example", 8) == 4
    home = site({"laptop": mac(1), "phone": mac(2), "tv": {"client_ids": ["tv-1"]}})
    laptop, phone, tv = (home.devices[d] for d in ("laptop", "phone", "tv"))
    assert pool.address(home, laptop, NAME, 4) is None
    assert pool.address(home, tv, NAME, 4) is None
    assert pool.address(home, phone, NAME, 4) == bytes((192, 0, 2, 4))
    assert pool.devices_at(home, NAME, (4, 0)) == [laptop, tv]
    assert pool.devices_at(home, NAME, (4, 1)) == []
    # Without the tv, the laptop has its slot to itself.
    alone = site({"laptop": mac(1), "phone": mac(2)})
    assert pool.address(alone, alone.devices["laptop"], NAME, 4) == bytes((192, 0, 2, 0))
    # A pool of one address tells nobody apart once two devices may be sent there.
    assert PagePool(("192.0.2.9/32",)).address(alone, alone.devices["laptop"], NAME, 4) is None


def config(**pages: object) -> Config:
    return load_config(
        None, {"policy": {"warning_page": ["127.0.0.9"]}, "pages": pages, "store": {"file": ""}}, environ={}
    )


@pytest.mark.parametrize(
    ("networks", "message"),
    [
        (["127.77.0.0/33"], "pages.device_networks: '127.77.0.0/33' does not appear to be an IPv4 or IPv6 network"),
        (["127.77.0.3/29"], "pages.device_networks: 127.77.0.3/29 has host bits set"),
        (["10.0.0.0/23"], "pages.device_networks: 10.0.0.0/23 has 512 addresses; at most 256"),
        (["2001:db8::/64"], "AnyIP route"),
        (["127.77.0.0/29", "127.77.0.4/30"], "pages.device_networks: 127.77.0.4/30 overlaps 127.77.0.0/29"),
        (["127.0.0.8/29"], "pages.device_networks: 127.0.0.8/29 holds policy.warning_page 127.0.0.9"),
        ("127.77.0.0/29", "pages.device_networks: must be a list of networks"),
    ],
)
def test_bad_device_networks_fail_at_start_up_naming_the_key(networks, message):
    with pytest.raises(ConfigError) as raised:
        config(device_networks=networks)
    assert message in str(raised.value)


def test_device_networks_need_the_shared_warning_page_and_the_pages_served():
    assert config(device_networks=["127.77.0.0/29", "2001:db8::/120"]).pages.device_networks == (
        "127.77.0.0/29",
        "2001:db8::/120",
    )
    with pytest.raises(ConfigError, match=r"pages.device_networks: needs policy.warning_page"):
        load_config(None, {"pages": {"device_networks": ["127.77.0.0/29"]}, "store": {"file": ""}}, environ={})
    with pytest.raises(ConfigError, match=r"pages.device_networks: needs pages.serve = true"):
        config(device_networks=["127.77.0.0/29"], serve=False)
