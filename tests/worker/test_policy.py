"""The default policy from the config, its verdicts, and the answers built for blocked names."""

from __future__ import annotations

import dns.edns
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from blocklists.catalog import load_catalog
from resolver.shared.config import PolicySettings, StoreSettings
from resolver.shared.dns import EdeCode
from resolver.shared.errors import ConfigError
from resolver.shared.identity import Identity, NetworkSet
from resolver.shared.policy.decision import Action, AnswerMode
from resolver.shared.policy.effective import PolicyMaker, answering_from, default_policy
from resolver.shared.store.file_policies import FileStore
from resolver.worker.answers import BlockedAnswers, build_blocked_answer
from resolver.worker.directory import Directory
from resolver.worker.wire import QueryParser

pytestmark = pytest.mark.unit
CATALOG = load_catalog()
PARSER = QueryParser()


def policy(**settings):
    return default_policy(PolicySettings(**settings), CATALOG)


def request(name="blocked.example", rdtype="A", **kwargs):
    return PARSER.parse(dns.message.make_query(name, rdtype, **kwargs).to_wire(), ("192.0.2.1", 1), False)


def ede(message):
    return [(o.code, o.text) for o in message.options if o.otype == dns.edns.OptionType.EDE]


def test_default_policy_follows_the_catalogue():
    default = policy()
    assert default.blocked == CATALOG.default_mask("block")
    assert default.warned == CATALOG.mask(["malware", "phishing"])
    assert default.mode is None and default.answering.mode is AnswerMode.NXDOMAIN


def test_blocked_beats_warned_and_names_the_categories():
    verdict = policy().verdict(CATALOG.mask(["drugs", "malware", "hate"]))
    assert verdict.action is Action.BLOCK
    assert verdict.reason == "drugs, hate"
    assert verdict.categories == CATALOG.mask(["drugs", "hate"])


def test_verdicts_are_interned_by_the_categories_that_matter():
    default = policy(block=["pornography"], warn=[])
    bits = CATALOG.mask(["pornography"])
    assert default.verdict(bits) is default.verdict(bits | CATALOG.mask(["drugs"]))  # drugs is not filtered here
    assert default.verdict(bits) is not policy(block=["pornography"], warn=[]).verdict(bits)


def test_explicit_lists_replace_the_defaults():
    custom = policy(block=["drugs"], warn=["pornography"])
    assert custom.blocked == CATALOG.mask(["drugs"])
    assert custom.warned == CATALOG.mask(["pornography"])
    assert not custom.filtered & CATALOG.mask(["malware"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"block": ["porn"]}, "policy.block: 'porn' not in the catalogue"),
        ({"warn": ["drugs"], "block": ["drugs"]}, "policy.warn: drugs also in policy.block"),
    ],
)
def test_bad_policy_names_the_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        policy(**settings)


def answer_for(verdict_policy, bits, name="blocked.example", rdtype="A", **kwargs):
    return dns.message.from_wire(build_blocked_answer(request(name, rdtype, **kwargs), verdict_policy.verdict(bits)))


def test_nxdomain_with_soa_and_ede_15():
    message = answer_for(policy(blocked_ttl=30), CATALOG.mask(["hate"]), use_edns=0)
    assert message.rcode() == dns.rcode.NXDOMAIN
    assert message.authority[0].rdtype == dns.rdatatype.SOA
    assert message.authority[0].ttl == 30 and message.authority[0][0].minimum == 30
    assert ede(message) == [(EdeCode.BLOCKED, "blocked: hate")]


def test_warning_without_page_is_answered_like_a_block_with_ede_17():
    message = answer_for(policy(), CATALOG.mask(["phishing"]), use_edns=0)
    assert message.rcode() == dns.rcode.NXDOMAIN
    assert ede(message) == [(EdeCode.FILTERED, "Web Protect: phishing")]


def test_warning_page_answers_its_address():
    warn_policy = policy(warning_page=("192.0.2.80", "2001:db8::80"))
    v4 = answer_for(warn_policy, CATALOG.mask(["malware"]), use_edns=0)
    assert [rr.address for rr in v4.answer[0]] == ["192.0.2.80"]
    v6 = answer_for(warn_policy, CATALOG.mask(["malware"]), rdtype="AAAA")
    assert [rr.address for rr in v6.answer[0]] == ["2001:db8::80"]


@pytest.mark.parametrize(
    ("settings", "rdtype", "expected"),
    [
        ({"answer": "nodata"}, "A", None),
        ({"answer": "null"}, "A", "0.0.0.0"),
        ({"answer": "null"}, "AAAA", "::"),
        ({"answer": "null"}, "MX", None),
        ({"answer": "page", "block_page": ("192.0.2.9",)}, "A", "192.0.2.9"),
        ({"answer": "page", "block_page": ("192.0.2.9",)}, "AAAA", None),
    ],
)
def test_answer_modes(settings, rdtype, expected):
    message = answer_for(policy(**settings), CATALOG.mask(["drugs"]), rdtype=rdtype)
    assert message.rcode() == dns.rcode.NOERROR
    if expected is None:
        assert not message.answer and message.authority[0].rdtype == dns.rdatatype.SOA
    else:
        assert message.answer[0][0].address == expected and message.answer[0].ttl == 10


def test_memoised_answers_keep_each_clients_id_and_case():
    answers = BlockedAnswers()
    verdict = policy().verdict(CATALOG.mask(["drugs"]))
    base = dns.message.make_query("Blocked.Example", "A").to_wire()
    for query_id in (1, 2):
        message = dns.message.from_wire(
            answers.answer(PARSER.parse(query_id.to_bytes(2, "big") + base[2:], ("192.0.2.1", 1), False), verdict)
        )
        assert message.id == query_id and str(message.question[0].name) == "Blocked.Example."


def test_clients_are_evicted_by_second_chance_not_by_arrival(tmp_path):
    settings = PolicySettings()
    maker = PolicyMaker(CATALOG, answering_from(settings), default_policy(settings, CATALOG))
    directory = Directory(
        FileStore(tmp_path / "policies.json", CATALOG),
        maker,
        CATALOG,
        NetworkSet(()),
        StoreSettings(client_cache=2),
    )

    def asks(address: str):
        return directory.client(PARSER.parse(dns.message.make_query("a.example", "A").to_wire(), (address, 1), False))

    for address in ("192.0.2.1", "192.0.2.2"):
        directory._bind(address, Identity(address), None)
    assert asks("192.0.2.1") is not None  # the older one is asked again: it gets a second chance
    directory._bind("192.0.2.1", Identity("192.0.2.1"), None)  # rebound (a site reload): still marked used
    directory._bind("192.0.2.3", Identity("192.0.2.3"), None)
    assert asks("192.0.2.1") is not None and asks("192.0.2.3") is not None
    assert asks("192.0.2.2") is None and len(directory) == 2
    # Every client used: the newcomer still gets in, and the table stays at its bound.
    assert asks("192.0.2.1") is not None and asks("192.0.2.3") is not None
    directory._bind("192.0.2.4", Identity("192.0.2.4"), None)
    assert asks("192.0.2.4") is not None and len(directory) == 2
