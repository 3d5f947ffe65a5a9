"""Rewrite a project's recorded answers when a template release renames or removes a question.

Run by a `_migrations` entry in copier.yml, in the `before` stage of `copier update`, in the
project's directory and with copier's own interpreter (which has PyYAML):

    answers.py rename OLD NEW    the answer given to OLD is kept, under NEW
    answers.py remove NAME       the answer is dropped; the question is gone

Copier then reads the answers again, so the user is not asked a renamed question twice and
the project keeps its answer.
"""

import sys
from pathlib import Path

import yaml

ANSWERS_FILE = Path(".copier-answers.yml")


def main(argv: list[str]) -> int:
    match argv:
        case ["rename", old, new]:
            pass
        case ["remove", old]:
            new = None
        case _:
            sys.stderr.write(__doc__ or "")
            return 2
    answers = yaml.safe_load(ANSWERS_FILE.read_text()) or {}
    if old in answers:
        value = answers.pop(old)
        if new is not None:
            answers.setdefault(new, value)
        ANSWERS_FILE.write_text(yaml.safe_dump(answers, sort_keys=False, allow_unicode=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
