"""Write convlora/_cli_spec.json, the snapshot of the ``convlora`` parser behind fast ``--help``.

Run after adding or changing any option of the ``convlora`` command (tests/test_cli_spec.py says when):

    python tools/write_cli_spec.py
"""

from convlora._cli_spec import SPEC_FILE, parser_spec
from convlora._io import write_json
from convlora.cli import build_parser

if __name__ == "__main__":
    write_json(SPEC_FILE, parser_spec(build_parser()))
    print(SPEC_FILE)
