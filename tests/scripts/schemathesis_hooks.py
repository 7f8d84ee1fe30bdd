"""schemathesis hooks for tests/test_api_schema.py (``SCHEMATHESIS_HOOKS=schemathesis_hooks``).

One kind of reported failure is dropped, because no server can tell it apart: a multipart request whose file part
(``image`` or ``audio``, ``format: binary``) was generated as "not binary". On the wire every multipart part is
bytes, so that request is a valid upload, which the server rightly accepts. Every other failure counts. The
stateful run sends JSON bodies only (:func:`filter_case`).
"""

import os

import schemathesis

FILE_PARTS = ("image", "audio")


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """False drops ``failure``."""
    message = str(getattr(failure, "message", ""))
    on_a_file_part = (
        case.media_type == "multipart/form-data"
        and "violates `format`" in message
        and any(f"/properties/{name}" in message for name in FILE_PARTS)
    )
    return not on_a_file_part


@schemathesis.hook
def filter_case(context, case) -> bool:
    """With ``SONIC_RT_SCHEMATHESIS_JSON_ONLY`` (the stateful run): JSON bodies only. schemathesis 4.32's state
    machine reported multipart steps as "schema-violating request accepted" whose own description said "positive
    test case"; multipart bodies are fuzzed by the other phases (valid and invalid) and by tests/test_predictions.py."""
    return not (os.environ.get("SONIC_RT_SCHEMATHESIS_JSON_ONLY") and case.media_type == "multipart/form-data")
