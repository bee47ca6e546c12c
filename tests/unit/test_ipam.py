"""IPAM, pure: default pools, overlap checks, allocate/release/reuse, clear errors."""
from ipaddress import IPv4Address, IPv4Network

import pytest

from mesh.errors import AllocationError
from mesh.ipam import DEFAULT_POOLS, AddressPool, check_subnet, default_gateway, pick_subnet


def test_default_pools_follow_docker_order():
    assert DEFAULT_POOLS[0] == IPv4Network("172.17.0.0/16")
    assert DEFAULT_POOLS[14] == IPv4Network("172.31.0.0/16")
    assert DEFAULT_POOLS[15] == IPv4Network("192.168.0.0/20")
    assert DEFAULT_POOLS[-1] == IPv4Network("192.168.240.0/20")


def test_pick_skips_routes_and_taken_subnets():
    routes = [IPv4Network("172.17.5.0/24"), IPv4Network("172.19.0.0/16")]
    taken = [IPv4Network("172.18.0.0/16")]
    assert pick_subnet(taken, routes) == IPv4Network("172.20.0.0/16")


def test_pick_skips_a_wide_route_covering_many_pools():
    assert pick_subnet([], [IPv4Network("172.16.0.0/12")]) == IPv4Network("192.168.0.0/20")


def test_pools_exhausted():
    with pytest.raises(AllocationError, match="no free default address pool"):
        pick_subnet([], [IPv4Network("172.16.0.0/12"), IPv4Network("192.168.0.0/16")])


def test_explicit_subnet_overlapping_a_route_or_network():
    with pytest.raises(AllocationError, match=r"networks.front: subnet 10.1.2.0/24 overlaps the host route 10.1.0.0/16"):
        check_subnet("front", IPv4Network("10.1.2.0/24"), {}, [IPv4Network("10.1.0.0/16")])
    with pytest.raises(AllocationError, match="overlaps network 'back'"):
        check_subnet("front", IPv4Network("10.1.2.0/24"), {"back": IPv4Network("10.1.0.0/16")}, [])


def test_allocate_skips_gateway_and_reuses_released():
    pool = AddressPool("n", IPv4Network("10.0.0.0/29"), IPv4Address("10.0.0.1"))
    got = [pool.allocate() for _ in range(5)]
    assert [str(a) for a in got] == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    with pytest.raises(AllocationError, match="networks.n: no free address left in subnet 10.0.0.0/29"):
        pool.allocate()
    pool.release("10.0.0.4")
    assert str(pool.allocate()) == "10.0.0.4"


def test_allocation_is_serial_a_released_address_comes_back_last():
    pool = AddressPool("n", IPv4Network("10.0.0.0/29"), IPv4Address("10.0.0.1"), after="10.0.0.3")
    assert str(pool.allocate()) == "10.0.0.4"             # after the one picked last
    pool.release("10.0.0.4")
    assert [str(pool.allocate()) for _ in range(4)] == ["10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.3"]
    assert str(pool.allocate()) == "10.0.0.4" and str(pool.last) == "10.0.0.4"   # wrapped around


def test_ip_range_limits_dynamic_addresses_but_not_static_ones():
    pool = AddressPool("n", IPv4Network("10.0.0.0/24"), IPv4Address("10.0.0.1"),
                       IPv4Network("10.0.0.128/30"))
    assert str(pool.allocate()) == "10.0.0.128"
    assert str(pool.reserve("10.0.0.20")) == "10.0.0.20"
    assert [str(pool.allocate()) for _ in range(3)] == ["10.0.0.129", "10.0.0.130", "10.0.0.131"]
    with pytest.raises(AllocationError, match="ip_range 10.0.0.128/30"):
        pool.allocate()


def test_static_address_errors():
    pool = AddressPool("n", IPv4Network("10.0.0.0/24"), IPv4Address("10.0.0.1"))
    with pytest.raises(AllocationError, match="outside subnet 10.0.0.0/24"):
        pool.reserve("10.0.1.5", "services.web.networks.n.ipv4_address")
    with pytest.raises(AllocationError, match="is the gateway"):
        pool.reserve("10.0.0.1")
    pool.reserve("10.0.0.7")
    with pytest.raises(AllocationError, match="already in use"):
        pool.reserve("10.0.0.7")
    with pytest.raises(AllocationError, match="broadcast"):
        pool.reserve("10.0.0.255")


def test_default_gateway_is_first_host():
    assert str(default_gateway(IPv4Network("172.18.0.0/16"))) == "172.18.0.1"
