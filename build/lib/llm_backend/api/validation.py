"""Request-body validation for Connexion: orjson parsing, cached validators, OpenAI-shaped errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterable
from typing import Any

import fastjsonschema
import orjson
from connexion.json_schema import Draft4RequestValidator
from connexion.utils import is_null, is_nullable
from connexion.validators import JSONRequestBodyValidator, ParameterValidator
from jsonschema import Draft4Validator, ValidationError
from jsonschema.exceptions import best_match
from starlette.types import Scope

from llm_backend.errors import InvalidRequest

logger = logging.getLogger(__name__)

BODY_STATE_KEY = "llmb.body"
_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def param_of(path: Iterable[Any]) -> str | None:
    """OpenAI's way of naming a field: messages.[0].content."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in path]
    return ".".join(parts) or None


def _is_role_mismatch(error: ValidationError) -> bool:
    return error.validator == "enum" and list(error.relative_path) == ["role"]


def _pick(error: ValidationError) -> ValidationError:
    """For a oneOf over message roles, report the branch whose role matches, not the generic failure."""
    while error.validator in ("oneOf", "anyOf") and error.context:
        if isinstance(error.instance, dict) and "role" in error.instance:
            by_branch: dict[int, list[ValidationError]] = {}
            for e in error.context:
                by_branch.setdefault(e.schema_path[0], []).append(e)  # type: ignore[arg-type]
            role_ok = [errs for errs in by_branch.values() if not any(_is_role_mismatch(e) for e in errs)]
            if not role_ok:
                return error  # no branch has this role: report the role itself
            return _pick(best_match([e for errs in role_ok for e in errs]))
        # a branch of the value's own type says what is wrong better than "expected another type"
        same_type = [e for e in error.context if e.validator != "type" or e.relative_path]
        picked = best_match(same_type or error.context)
        if picked is error:
            break
        error = picked
    return error


def to_invalid_request(error: ValidationError, prefix: Iterable[Any] = ()) -> InvalidRequest:
    """A jsonschema error as OpenAI words it; `prefix` names the value validated (a query parameter)."""
    error = _pick(error)
    path = [*prefix, *error.absolute_path]
    param = param_of(path)
    instance = error.instance
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        full = param_of([*path, missing])
        return InvalidRequest(
            f"Missing required parameter: '{full}'.", param=full, code="missing_required_parameter"
        )
    if error.validator in ("oneOf", "anyOf") and isinstance(instance, dict) and "role" in instance:
        roles = "'system', 'developer', 'user', 'assistant', 'tool' and 'function'"
        return InvalidRequest(
            f"Invalid value: '{instance.get('role')}'. Supported values are: {roles}.",
            param=param_of([*path, "role"]),
            code="invalid_value",
        )
    if error.validator == "type" or (
        error.validator in ("oneOf", "anyOf") and not isinstance(instance, dict)
    ):
        expected = error.validator_value if error.validator == "type" else None
        if expected is None:
            types = sorted(
                {str(s.get("type")) for s in error.validator_value if isinstance(s, dict) and s.get("type")}
            )
            wanted = " or ".join(_TYPE_NAMES.get(t, t) for t in types) or "another type"
        else:
            wanted = _TYPE_NAMES.get(str(expected), str(expected))
        got = _TYPE_NAMES.get(_json_type(instance), _json_type(instance))
        return InvalidRequest(
            f"Invalid type for '{param}': expected {wanted}, but got {got} instead.",
            param=param,
            code="invalid_type",
        )
    if error.validator == "enum":
        allowed = ", ".join(f"'{v}'" for v in error.validator_value if v is not None)
        return InvalidRequest(
            f"Invalid value: '{instance}'. Supported values are: {allowed}.",
            param=param,
            code="invalid_value",
        )
    bound = _bound_message(error, param or "body")
    if bound is not None:
        return bound
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = set(error.schema.get("properties") or ())
        extra = sorted(k for k in instance if k not in known)
        name = param_of([*path, extra[0]]) if extra else param
        return InvalidRequest(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
    if error.validator == "format":
        return InvalidRequest(
            f"Invalid value for '{param}': expected {_FORMATS.get(str(error.validator_value), 'a ' + str(error.validator_value))}.",
            param=param,
            code="invalid_value",
        )
    return InvalidRequest(f"Invalid value for '{param or 'body'}'.", param=param, code="invalid_value")


_FORMATS = {
    "date-time": "an ISO 8601 date and time such as 2026-01-31T12:00:00Z",
    "date": "a date (YYYY-MM-DD)",
}


_LENGTHS = {
    "minItems": ("array", "min"),
    "maxItems": ("array", "max"),
    "minLength": ("string", "min"),
    "maxLength": ("string", "max"),
}


def _bound_message(error: ValidationError, param: str) -> InvalidRequest | None:
    """OpenAI's wording for values out of bounds: "Invalid 'n': integer above maximum value. Expected a
    value <= 128, but got 130 instead." (code integer_above_max_value), and its like for lengths."""
    limit = error.validator_value
    got = error.instance
    kind = "integer" if error.schema.get("type") == "integer" else "decimal"
    if error.validator in ("minimum", "maximum"):
        side, word, op = ("below", "min", ">=") if error.validator == "minimum" else ("above", "max", "<=")
        return InvalidRequest(
            f"Invalid '{param}': {kind} {side} {word}imum value. Expected a value {op} {limit}, "
            f"but got {got} instead.",
            param=param,
            code=f"{kind}_{side}_{word}_value",
        )
    if error.validator in _LENGTHS:
        noun, word = _LENGTHS[error.validator]
        if not isinstance(got, list if noun == "array" else str):
            return None
        a = "an" if noun == "array" else "a"
        if word == "min" and not got:
            return InvalidRequest(
                f"Invalid '{param}': empty {noun}. Expected {a} {noun} with minimum length {limit}, "
                f"but got an empty {noun} instead.",
                param=param,
                code=f"empty_{noun}",
            )
        side, short = ("below", "too short") if word == "min" else ("above", "too long")
        return InvalidRequest(
            f"Invalid '{param}': {noun} {short}. Expected {a} {noun} with {word}imum length {limit}, "
            f"but got {a} {noun} with length {len(got)} instead.",
            param=param,
            code=f"{noun}_{side}_{word}_length",
        )
    return None


def to_json_schema(schema: Any) -> Any:
    """An OpenAPI 3.0 schema as plain JSON Schema: `nullable: true` becomes an explicit null alternative."""
    if isinstance(schema, list):
        return [to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("nullable", "discriminator", "xml", "externalDocs", "example", "deprecated", "readOnly"):
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("enum", "required", "default"):
            out[key] = value
        else:
            out[key] = to_json_schema(value)
    if schema.get("nullable") is True:
        if isinstance(out.get("type"), str) and not {"oneOf", "anyOf", "allOf"} & set(out):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            return {"anyOf": [{"type": "null"}, out]}
    return out


def _types_of(branch: Any) -> set[str] | None:
    t = branch.get("type") if isinstance(branch, dict) else None
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return set(t)
    return None


def _roles_of(branch: Any) -> set[str] | None:
    if not isinstance(branch, dict):
        return None
    role = (branch.get("properties") or {}).get("role")
    enum = role.get("enum") if isinstance(role, dict) else None
    return set(enum) if enum and "role" in branch.get("required", ()) else None


def _disjoint(sets: list[set[str] | None]) -> bool:
    if any(s is None for s in sets):
        return False
    seen: set[str] = set()
    for s in sets:
        assert s is not None
        if seen & s:
            return False
        seen |= s
    return True


class _FastPath:
    """A compiled validator for valid bodies. Two rewrites keep it from raising on valid input (raising is
    what makes compiled oneOf slow): a oneOf whose branches have disjoint types becomes anyOf, and a oneOf
    over message shapes told apart by `role` is checked by the branch of the message's role."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.unions: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self.top = fastjsonschema.compile(self._rewrite(schema, ()), use_default=False)

    def _rewrite(self, schema: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(schema, dict):
            return schema
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                out[key] = {name: self._rewrite(sub, (*path, name)) for name, sub in value.items()}
            elif key == "items" and isinstance(value, dict):
                out[key] = self._rewrite(value, (*path, "*"))
            elif key in ("allOf", "anyOf") and isinstance(value, list):
                out[key] = [self._rewrite(sub, path) for sub in value]
            elif key == "oneOf" and isinstance(value, list):
                roles = [_roles_of(b) for b in value]
                if _disjoint(roles):
                    validators: dict[str, Any] = {}
                    for branch, names in zip(value, roles, strict=True):
                        compiled = fastjsonschema.compile(branch, use_default=False)
                        for name in names or ():
                            validators[name] = compiled
                    self.unions.append((path, validators))
                    all_roles = sorted(validators)
                    out["type"] = "object"
                    out["required"] = ["role"]
                    out["properties"] = {"role": {"type": "string", "enum": all_roles}}
                elif _disjoint([_types_of(b) for b in value]):
                    out["anyOf"] = [self._rewrite(sub, path) for sub in value]
                else:
                    out[key] = [self._rewrite(sub, path) for sub in value]
            else:
                out[key] = value
        return out

    def __call__(self, body: Any) -> None:
        self.top(body)
        for path, validators in self.unions:
            for item in _walk(body, path):
                validators[item["role"]](item)


def _walk(data: Any, path: tuple[str, ...]) -> list[Any]:
    items = [data]
    for step in path:
        nxt: list[Any] = []
        for item in items:
            if step == "*":
                if isinstance(item, list):
                    nxt.extend(item)
            elif isinstance(item, dict) and step in item:
                nxt.append(item[step])
        items = nxt
    return items


class _Compiled:
    """One schema's validators: a compiled fast path for the common, valid case, and jsonschema to say
    precisely what is wrong with an invalid body."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.precise = Draft4RequestValidator(schema, format_checker=Draft4Validator.FORMAT_CHECKER)
        self.fast: Any = None
        try:
            self.fast = _FastPath(to_json_schema(schema))
        except Exception:  # a construct the compiler does not know: the precise validator alone
            logger.warning("request schema not compilable; validating with jsonschema only", exc_info=True)

    def validate(self, body: Any) -> None:
        if self.fast is not None:
            try:
                self.fast(body)
                return
            except (fastjsonschema.JsonSchemaValueException, KeyError, TypeError):
                pass
        self.precise.validate(body)


class OpenAIJSONBodyValidator(JSONRequestBodyValidator):
    """Parses once with orjson (the handler reuses the result) and compiles each schema's validator once."""

    _cache: dict[int, _Compiled] = {}

    @property
    def _validator(self) -> _Compiled:  # type: ignore[override]
        key = id(self._schema)
        hit = self._cache.get(key)
        if hit is None or hit.schema is not self._schema:
            hit = self._cache[key] = _Compiled(self._schema)
        return hit

    async def _parse(self, stream: AsyncGenerator[bytes, None], scope: Scope) -> Any:
        raw = b"".join([chunk async for chunk in stream])
        if not raw:
            return None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(
                f"We could not parse the JSON body of your request ({exc}). The body must be valid JSON.",
                code="invalid_json",
            ) from None
        if not isinstance(body, dict):
            # null, an array, a string or a number: refused here, so no handler ever sees one (a JSON
            # null would otherwise pass as "no body" on routes whose body is optional)
            got = _TYPE_NAMES[_json_type(body)]
            raise InvalidRequest(
                f"The request body must be a JSON object, but got {got} instead.", code="invalid_json"
            )
        scope.setdefault("state", {})[BODY_STATE_KEY] = (body, raw)
        return body

    def _validate(self, body: Any) -> dict[str, Any] | None:
        if body is None:
            if not self._required:
                return None
            raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
        try:
            self._validator.validate(body)
        except ValidationError as exc:
            raise to_invalid_request(exc) from None
        return None


class OpenAIParameterValidator(ParameterValidator):
    """Query, path and header parameters checked as the spec says, with OpenAI's wording for what is wrong
    ("Invalid value: 'pdf'. Supported values are: 'json', 'markdown'.") instead of jsonschema's text."""

    @staticmethod
    def validate_parameter(parameter_type: str, value: Any, param: Any, param_name: Any = None) -> None:
        if is_nullable(param) and is_null(value):
            return None
        name = str(param.get("name"))
        if value is None:
            if param.get("required"):
                raise InvalidRequest(
                    f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
                )
            return None
        schema = param.get("schema", param)
        validator = _PARAM_VALIDATORS.get(id(schema))
        if validator is None or validator[0] is not schema:
            validator = _PARAM_VALIDATORS[id(schema)] = (
                schema,
                Draft4Validator(schema, format_checker=Draft4Validator.FORMAT_CHECKER),
            )
        error = best_match(validator[1].iter_errors(value))
        if error is not None:
            raise to_invalid_request(error, prefix=[name])
        return None


_PARAM_VALIDATORS: dict[int, tuple[Any, Draft4Validator]] = {}
