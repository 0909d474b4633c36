"""Write the JSON Schemas of the evaluation spec and the result document.

    python -m schemas [OUT_DIR]      (default: schemas/json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.evaluation import EvaluationResult, EvaluationSpec

SCHEMAS: dict[str, type[BaseModel]] = {"evaluation-spec": EvaluationSpec,
                                        "evaluation-result": EvaluationResult}


def render() -> dict[str, str]:
    return {f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
            for name, model in SCHEMAS.items()}


def main(out: str = str(Path(__file__).parent / "json")) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for filename, text in render().items():
        (folder / filename).write_text(text)
        print(f"wrote {folder / filename}")


if __name__ == "__main__":
    main(*sys.argv[1:])
