from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from items.models import ApiKey
from items.services import hash_api_key

pytestmark = pytest.mark.django_db


def test_create_api_key_prints_the_raw_key_alone_on_the_last_line() -> None:
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_key", "deploy-bot", stdout=out, stderr=err)
    lines = out.getvalue().splitlines()
    raw_key = lines[-1]
    assert raw_key.strip() == raw_key
    assert " " not in raw_key
    api_key = ApiKey.objects.get(name="deploy-bot")
    assert api_key.key_hash == hash_api_key(raw_key)
    assert raw_key not in err.getvalue()


def test_create_api_key_needs_a_name() -> None:
    with pytest.raises(CommandError, match="name"):
        call_command("create_api_key", " ")
