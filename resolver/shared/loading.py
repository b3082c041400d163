"""What every process of a node loads the same way: the catalogue, the lists and the default policy."""

from __future__ import annotations

from pathlib import Path

from blocklists.catalog import Catalog, load_catalog
from blocklists.errors import BlocklistError
from resolver.shared.config import Config
from resolver.shared.errors import StartupError
from resolver.shared.lists import Lists, cache_dir_of, served_path, verified_link
from resolver.shared.policy.effective import PolicyMaker, answering_from, default_policy


def load_policy_and_lists(config: Config) -> tuple[Catalog, PolicyMaker, Lists]:
    """The catalogue, the policy maker (with the default policy) and the lists, or a StartupError or
    ConfigError saying what is wrong. A list file found corrupt is replaced by the last list this node
    verified for its path (see Lists), if it has one."""
    try:
        catalog = load_catalog(Path(config.lists.catalog) if config.lists.catalog else None)
    except BlocklistError as exc:
        raise StartupError(f"lists.catalog: {exc}") from None
    try:
        path, required = served_path(config.lists)
        lists = Lists(
            path,
            catalog,
            config.lists.hot_names,
            config.lists.check_interval,
            cache_dir_of(config.lists),
            required,
            verified_link(config.lists),
        )
    except BlocklistError as exc:
        raise StartupError(f"lists: {exc} (and this node holds no earlier verified list for that path)") from None
    return catalog, policy_maker(config, catalog), lists


def policy_maker(config: Config, catalog: Catalog) -> PolicyMaker:
    return PolicyMaker(catalog, answering_from(config.policy), default_policy(config.policy, catalog))
