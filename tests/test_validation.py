"""Validation errors name the field as the operator wrote it, the value and the fix."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import BaseModel, Field, ValidationError, model_validator

from vppmesh.validation import describe, option_name, problems


class Spec(BaseModel):
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = ()
    network: ipaddress.IPv4Network | None = None
    queues: int = Field(default=1, ge=1)
    name: str = "x"

    @model_validator(mode="after")
    def _named(self) -> Spec:
        if self.name == "bad":
            raise ValueError("name 'bad' is reserved; choose another")
        return self


def error(**fields: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Spec(**fields)  # type: ignore[arg-type]
    return info.value


def test_union_members_merge_into_one_problem_naming_the_value() -> None:
    found = problems(error(addresses=["192.0.2.1/24", "192.0.2.1/99"]))
    assert found == [(("addresses", 1), "'192.0.2.1/99' is not a valid IPv4 or IPv6 address "
                      "with prefix length (e.g. 192.0.2.11/24 or 2001:db8::11/64)")]


def test_one_family_field_gives_that_family_and_its_example() -> None:
    assert problems(error(network="198.18.1.0/33")) == [
        (("network",), "'198.18.1.0/33' is not a valid IPv4 network (e.g. 198.18.1.0/24)")]


def test_separate_problems_stay_separate_and_in_order() -> None:
    text = describe(error(addresses=["nope"], queues=0))
    assert text.startswith("addresses.0: 'nope' is not a valid IPv4 or IPv6")
    assert text.endswith("; queues: Input should be greater than or equal to 1")


def test_model_errors_lose_pydantics_prefix() -> None:
    assert describe(error(name="bad")) == \
        "(top level): name 'bad' is reserved; choose another"


def test_option_names_follow_the_command_line() -> None:
    text = describe(error(addresses=["1.2.3.4/99"], queues=0),
                    name=option_name({"addresses": "address"}))
    assert text.startswith("--address[0]: '1.2.3.4/99' is not a valid")
    assert "; --queues: " in text
    assert describe(error(name="bad"), name=option_name()) == \
        "(options): name 'bad' is reserved; choose another"
