"""Whether the shipped option schema was generated with the installed TRL, transformers and accelerate: the tests of
its fast path only mean something then (with other versions the CLI asks the live parser, tested on its own)."""

import pytest

from trb_trl import config_schema


SCHEMA_VERSIONS = config_schema.load_schema().get("versions")
schema_versions_installed = pytest.mark.skipif(
    SCHEMA_VERSIONS != config_schema.installed_versions(),
    reason=(
        f"the shipped option schema was generated with {SCHEMA_VERSIONS}, not the installed "
        f"{config_schema.installed_versions()}: the CLI asks the live parser instead; run "
        "`python -m trb_trl.scripts.write_config_schema --write` when moving the pins"
    ),
)
