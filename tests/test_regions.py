"""The one list of Genesys Cloud regions agrees with the official SDK's hosts (a test-only dependency)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from monitor_project.settings.environment import Environment
from monitor_project.settings.genesys import REGION_DOMAINS, load


def sdk_api_hosts() -> dict[str, str]:
    """Region name -> API host, read from the SDK's own enum (loaded alone: the SDK package imports thousands
    of models)."""
    package = importlib.util.find_spec("PureCloudPlatformClientV2")
    assert package is not None and package.origin is not None, "the Genesys SDK is a test dependency"
    spec = importlib.util.spec_from_file_location(
        "purecloud_region_hosts", Path(package.origin).with_name("purecloud_region_hosts.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {region.name.replace("_", "-"): region.value for region in module.PureCloudRegionHosts}


def test_every_region_of_the_sdk_is_known_with_the_same_api_host() -> None:
    assert {name: f"https://api.{domain}" for name, domain in REGION_DOMAINS.items()} == sdk_api_hosts()


@pytest.mark.parametrize("region", ["eusc-de-east-1", "edee1.eusc-pure.cloud", " EUSC-DE-EAST-1 "])
def test_the_eu_sovereign_cloud_is_a_region_by_name_or_domain(region: str) -> None:
    config = load(Environment(source={"GENESYSCLOUD_REGION": region}))
    assert (config.api_url, config.login_url) == ("https://api.edee1.eusc-pure.cloud",
                                                  "https://login.edee1.eusc-pure.cloud")


def test_an_unknown_region_names_the_variable_and_the_regions() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"^GENESYSCLOUD_REGION='mars-1' is not valid: .*eusc-de-east-1"):
        load(Environment(source={"GENESYSCLOUD_REGION": "mars-1"}))
