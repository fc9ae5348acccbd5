"""Which tables the checkpoint tidies after CRIU's iptables lock (shim.checkpoint.netlock.empty_new_tables):
only tables that are new, empty and not our lock's, read from `nft -j list ruleset`."""

from __future__ import annotations

from shim.checkpoint import netlock

# What iptables-nft leaves after CRIU's unlock: `ip filter` with its base chains and no rule, and the
# pod's own table with a rule; our lock table; a table that was there before the dump.
RULESET = {"nftables": [
    {"metainfo": {"version": "1.1.3", "json_schema_version": 1}},
    {"table": {"family": "ip", "name": "filter", "handle": 1}},
    {"chain": {"family": "ip", "table": "filter", "name": "INPUT", "handle": 1, "type": "filter"}},
    {"table": {"family": "ip6", "name": "filter", "handle": 2}},
    {"table": {"family": "inet", "name": "app", "handle": 3}},
    {"chain": {"family": "inet", "table": "app", "name": "in", "handle": 1}},
    {"rule": {"family": "inet", "table": "app", "chain": "in", "handle": 2, "expr": []}},
    {"table": {"family": "inet", "name": netlock.TABLE, "handle": 4}},
    {"table": {"family": "ip", "name": "nat", "handle": 5}},
]}


def test_new_empty_tables_go_and_nothing_else() -> None:
    assert netlock.empty_new_tables(RULESET, before={"ip nat"}) == ["ip filter", "ip6 filter"]


def test_a_table_there_before_the_dump_stays_even_when_empty() -> None:
    assert netlock.empty_new_tables(RULESET, before={"ip nat", "ip filter"}) == ["ip6 filter"]


def test_a_table_with_a_rule_stays() -> None:
    with_rule = {"nftables": [*RULESET["nftables"],
                              {"rule": {"family": "ip6", "table": "filter", "chain": "INPUT", "expr": []}}]}
    assert netlock.empty_new_tables(with_rule, before={"ip nat"}) == ["ip filter"]


def test_garbage_listings_name_nothing() -> None:
    for garbage in (None, [], "x", {"nftables": "x"}, {"nftables": [1, "a", {"table": "x"}, {"rule": None}]}, {}):
        assert netlock.empty_new_tables(garbage, before=set()) == []


def test_criu_s_nftables_lock_table_is_removed_and_nothing_else() -> None:
    """With `network-lock nftables` CRIU's lock is a table of its own, inet CRIU-<run id>."""
    ruleset = {"nftables": [
        {"table": {"family": "inet", "name": "CRIU-8f14e45f-ceea-467f-a9b8-8b1f6e3c1d2a"}},
        {"chain": {"family": "inet", "table": "CRIU-8f14e45f-ceea-467f-a9b8-8b1f6e3c1d2a", "name": "input"}},
        {"table": {"family": "inet", "name": "criu_shim_lock"}},  # ours: its own unlock removes it
        {"table": {"family": "ip", "name": "CRIU-1234"}},  # not the family CRIU uses: not CRIU's
        {"table": {"family": "inet", "name": "CRIU-"}},
        {"table": {"family": "inet", "name": "CRIU-x; delete table inet criu_shim_lock"}},
        {"table": {"family": "inet", "name": ["CRIU-1"]}},
    ]}
    assert netlock.criu_unlock_script(ruleset).splitlines() == [
        "delete table inet CRIU-8f14e45f-ceea-467f-a9b8-8b1f6e3c1d2a"]


def test_names_a_pod_chose_never_reach_an_nft_script() -> None:
    """A pod with CAP_NET_ADMIN names its tables and chains as it likes (the kernel takes any bytes):
    a listing item whose family or names are not plain is left alone, never written into a script
    nft would read (`include "/etc/shadow"` after a newline, say)."""
    evil = 'x\ninclude "/etc/shadow"'
    jump = [{"jump": {"target": "CRIU"}}]
    ruleset = {"nftables": [
        {"table": {"family": "ip", "name": evil}},  # new and empty: would be deleted by name
        {"chain": {"family": "ip", "table": evil, "name": "CRIU"}},
        {"rule": {"family": "ip", "table": evil, "chain": "INPUT", "handle": 3, "expr": jump}},
        {"rule": {"family": "ip;flush ruleset", "table": "filter", "chain": "INPUT", "handle": 4, "expr": jump}},
        {"rule": {"family": "ip", "table": "filter", "chain": "INPUT", "handle": "5; flush ruleset", "expr": jump}},
        {"chain": {"family": "ip", "table": "filter", "name": "CRIU"}},
        {"rule": {"family": "ip", "table": "filter", "chain": "INPUT", "handle": 6, "expr": jump}},
    ]}
    assert netlock.criu_unlock_script(ruleset).splitlines() == [
        "delete rule ip filter INPUT handle 6", "flush chain ip filter CRIU", "delete chain ip filter CRIU"]
    assert netlock.empty_new_tables(ruleset, set()) == []  # `ip filter` has a rule; the other is not nameable
