"""Validate response bodies against the schemas in OpenAI's own OpenAPI file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

# OpenAI's own OpenAPI description (MIT, see openai-openapi.LICENSE beside it), kept with the tests.
SPEC = Path(__file__).resolve().parent / "reference" / "openai-openapi.yaml"
_URI = "urn:openai-openapi"


def _nullable_to_type(node: Any) -> Any:
    """OpenAPI's leftover `nullable: true` means JSON Schema's type [..., "null"]."""
    if isinstance(node, dict):
        node = {k: _nullable_to_type(v) for k, v in node.items()}
        if node.pop("nullable", False) is True:
            if isinstance(node.get("type"), str):
                node["type"] = [node["type"], "null"]
            if "enum" in node and None not in node["enum"]:
                node["enum"] = [*node["enum"], None]
        return node
    if isinstance(node, list):
        return [_nullable_to_type(v) for v in node]
    return node


@lru_cache(maxsize=1)
def _registry() -> Registry:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    document = _nullable_to_type(yaml.load(SPEC.read_text(), Loader=loader))
    resource = Resource(contents=document, specification=DRAFT202012)
    return Registry().with_resource(_URI, resource)


def validate(body: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError if `body` does not match components/schemas/`schema_name`."""
    validator = Draft202012Validator(
        {"$ref": f"{_URI}#/components/schemas/{schema_name}"}, registry=_registry()
    )
    validator.validate(body)
