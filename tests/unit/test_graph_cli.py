"""Diagrams (Mermaid, DOT) and the offline CLI commands: validate, graph, import agentmap."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from agentflow_cli.main import cli
from agentflow_core.graph import dot_text, mermaid_text, to_dot, to_mermaid
from agentflow_core.spec import WorkflowSpec, parse_workflow

FSM: dict[str, Any] = {
    "name": "triage",
    "agents": {"classify": {"type": "echo"}, "fix": {"type": "echo"}, "oops": {"type": "fail"}},
    "planner": {
        "type": "fsm",
        "initial_state": "classify",
        "states": {
            "classify": {
                "on_success": "route",
                "on_error": "failed",
                "on_timeout": "failed",
                "conditional_transitions": [{"condition": 'last.kind == "urgent"', "target": "fix"}],
            },
            "route": {"condition": "last.score < 0.5", "on_true": "fix", "on_false": "done"},
            "fix": {"agent": "fix", "on_success": "done", "on_error": "repair", "max_visits": 2},
            "repair": {"agent": "oops", "on_success": "fix", "on_error": "failed"},
        },
        "final_states": {"done": {}, "failed": {"status": "failed"}},
    },
}

BT: dict[str, Any] = {
    "name": "tree",
    "agents": {"fetch": {"type": "echo"}, "store": {"type": "echo"}},
    "planner": {
        "type": "behavior_tree",
        "root": {
            "type": "sequence",
            "name": "main",
            "children": [
                {"type": "condition", "name": "has_id", "check": "has(input.id)"},
                {"type": "retry", "max_attempts": 3, "child": {"type": "action", "name": "get", "agent": "fetch"}},
                {
                    "type": "conditional_selector",
                    "conditions": [
                        {"expression": "last.size > 10", "child": {"type": "action", "name": "big", "agent": "store"}},
                        {"default": True, "child": {"type": "action", "name": "small", "agent": "store"}},
                    ],
                },
            ],
        },
    },
}

DAG: dict[str, Any] = {
    "name": "pipeline",
    "agents": {"a": {"type": "echo"}, "b": {"type": "echo"}, "c": {"type": "echo"}},
    "planner": {
        "type": "dag",
        "steps": {
            "extract": {"agent": "a"},
            "transform": {"agent": "b", "depends_on": ["extract"], "condition": 'steps.extract.status == "succeeded"'},
            "audit": {
                "agent": "c",
                "depends_on": ["extract"],
                "condition": {"operator": "equals", "left": "$extract.result", "right": 1},
            },
            "load": {"agent": "a", "depends_on": ["transform", "audit"]},
        },
    },
}

LLM: dict[str, Any] = {
    "name": "planned",
    "agents": {"a": {"type": "echo"}},
    "planner": {
        "type": "llm",
        "model": {"model": "gpt-4o-mini"},
        "fallback": {
            "type": "fsm",
            "initial_state": "only",
            "states": {"only": {"agent": "a", "on_success": "done"}},
            "final_states": ["done"],
        },
    },
}


def spec_of(data: dict[str, Any]) -> WorkflowSpec:
    return parse_workflow(data)


def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# --- Mermaid / DOT structure ------------------------------------------------------------

_MERMAID_LABEL = r'"[^"\n]*"'
_MERMAID_NODE = re.compile(
    rf"(n\d+)(?:\(\({_MERMAID_LABEL}\)\)|\({_MERMAID_LABEL}\)|\(\[{_MERMAID_LABEL}\]\)|\{{\{{{_MERMAID_LABEL}\}}\}}"
    rf"|\{{{_MERMAID_LABEL}\}}|\[\[{_MERMAID_LABEL}\]\]|\[{_MERMAID_LABEL}\])"
)
_MERMAID_EDGE = re.compile(rf"(n\d+) (?:-->|-\.->)(?:\|{_MERMAID_LABEL}\|)? (n\d+)")


def check_mermaid(text: str) -> dict[str, Any]:
    """A strict line grammar for what ``to_mermaid`` emits (the subset of Mermaid it uses).

    Returns the labels by node id and the edges, for assertions."""
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    labels: dict[str, str] = {}
    edges: list[tuple[str, str, str | None]] = []
    depth = 0
    for raw in lines[1:]:
        line = raw.strip()
        if m := _MERMAID_NODE.fullmatch(line):
            labels[m.group(1)] = re.search(_MERMAID_LABEL, line).group(0)[1:-1]  # type: ignore[union-attr]
        elif m := _MERMAID_EDGE.fullmatch(line):
            label = re.search(r'\|"([^"]*)"\|', line)
            edges.append((m.group(1), m.group(2), label.group(1) if label else None))
        elif re.fullmatch(rf"subgraph c\d+\[{_MERMAID_LABEL}\]", line):
            depth += 1
        elif line == "end":
            depth -= 1
            assert depth >= 0
        elif not re.fullmatch(r"classDef \w+ [\w:#,]+|class (n\d+,?)+ \w+", line):
            raise AssertionError(f"unexpected Mermaid line: {raw!r}")
    assert depth == 0
    for src, dst, _ in edges:
        assert src in labels and dst in labels
    return {"labels": labels, "edges": edges}


def check_dot(text: str, tmp_path: Path) -> dict[str, Any]:
    """Parse with Graphviz when it is installed; always check the structure."""
    dot = shutil.which("dot")
    if dot is not None:
        src = tmp_path / "g.dot"
        src.write_text(text)
        done = subprocess.run([dot, "-Tsvg", str(src)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not done.stderr, done.stderr
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    # Every quote is escaped or paired: remove escaped ones, the rest must pair up.
    assert text.replace('\\"', "").count('"') % 2 == 0
    labels = dict(re.findall(r'^\s*(n\d+) \[label="((?:[^"\\]|\\.)*)"', text, flags=re.M))
    edges = re.findall(r'^\s*(n\d+) -> (n\d+)(?: \[label="((?:[^"\\]|\\.)*)")?', text, flags=re.M)
    for src, dst, _ in edges:
        assert src in labels and dst in labels
    return {"labels": labels, "edges": edges}


def named_edges(drawing: dict[str, Any]) -> set[tuple[str, str, str | None]]:
    """Edges as (first label line of src, of dst, edge label)."""
    labels = drawing["labels"]

    def head(node_id: str) -> str:
        return re.split(r"<br>|\\n", labels[node_id])[0]

    return {(head(s), head(d), label or None) for s, d, label in drawing["edges"]}


def test_fsm_diagram_shows_states_finals_and_labelled_transitions(tmp_path: Path) -> None:
    spec = spec_of(FSM)
    mermaid = check_mermaid(to_mermaid(spec))
    edges = named_edges(mermaid)
    assert {
        ("start", "classify", None),
        ("classify", "fix", "last.kind == #quot;urgent#quot;"),
        ("classify", "route", "success"),
        ("classify", "failed", "error, timeout"),
        ("route", "fix", "true"),
        ("route", "done", "false"),
        ("fix", "done", "success"),
        ("fix", "repair", "error"),
        ("repair", "fix", "success"),
    } <= edges
    labels = set(mermaid["labels"].values())
    assert "route<br>last.score #lt; 0.5" in labels  # a decision state shows its condition
    assert "fix<br>max_visits: 2" in labels and "repair<br>agent: oops" in labels
    assert "failed<br>(failed)" in labels
    text = to_mermaid(spec)
    assert re.search(r'n\d+\{"route<br>', text)  # decision states are diamonds
    assert "class " in text and "failed" in text

    dot = check_dot(to_dot(spec), tmp_path)
    assert ("classify", "route", "success") in named_edges(dot)
    assert ("classify", "fix", 'last.kind == \\"urgent\\"') in named_edges(dot)
    assert "shape=diamond" in to_dot(spec) and "shape=doublecircle" in to_dot(spec)


def test_behavior_tree_diagram_is_the_tree_in_order(tmp_path: Path) -> None:
    spec = spec_of(BT)
    mermaid = check_mermaid(to_mermaid(spec))
    edges = named_edges(mermaid)
    assert {
        ("start", "sequence: main", None),
        ("sequence: main", "condition: has_id", "1"),
        ("sequence: main", "retry x3", "2"),
        ("retry x3", "action: get", None),
        ("sequence: main", "conditional_selector", "3"),
        ("conditional_selector", "action: big", "last.size #gt; 10"),
        ("conditional_selector", "action: small", "default"),
    } == edges
    assert "condition: has_id<br>has(input.id)" in mermaid["labels"].values()
    assert "action: get<br>agent: fetch" in mermaid["labels"].values()
    dot = check_dot(to_dot(spec), tmp_path)
    assert ("conditional_selector", "action: big", "last.size > 10") in named_edges(dot)


def test_dag_diagram_shows_dependencies_and_conditions(tmp_path: Path) -> None:
    spec = spec_of(DAG)
    mermaid = check_mermaid(to_mermaid(spec))
    assert named_edges(mermaid) == {
        ("start", "extract", None),
        ("extract", "transform", None),
        ("extract", "audit", None),
        ("transform", "load", None),
        ("audit", "load", None),
    }
    labels = set(mermaid["labels"].values())
    assert "transform<br>agent: b<br>when steps.extract.status == #quot;succeeded#quot;" in labels
    # The operator form is shown as the CEL it stands for.
    assert "audit<br>agent: c<br>when (steps.extract.result == 1)" in labels
    check_dot(to_dot(spec), tmp_path)


def test_llm_diagram_is_one_planner_node_and_its_fallback(tmp_path: Path) -> None:
    spec = spec_of(LLM)
    text = to_mermaid(spec)
    mermaid = check_mermaid(text)
    assert "LLM planner<br>model: openai/gpt-4o-mini<br>max_steps: 20" in mermaid["labels"].values()
    assert "subgraph c" in text and "fallback (FSM)" in text
    assert re.search(r'n\d+ -\.->\|"on plan failure"\| n\d+', text)
    assert ("start", "only", None) in named_edges(mermaid) and ("only", "done", "success") in named_edges(mermaid)
    dot_source = to_dot(spec)
    check_dot(dot_source, tmp_path)
    assert "subgraph cluster_" in dot_source and "style=dashed" in dot_source


def test_labels_are_escaped() -> None:
    assert mermaid_text('say "hi" | #1 <b> & `x`\nnext') == (
        '"say #quot;hi#quot; #124; #35;1 #lt;b#gt; #amp; #96;x#96;<br>next"'
    )
    assert dot_text('a "b" \\ c\nd') == '"a \\"b\\" \\\\ c\\nd"'


def test_hostile_names_stay_inside_their_labels(tmp_path: Path) -> None:
    data = json.loads(json.dumps(FSM))
    data["planner"]["states"]["classify"]["conditional_transitions"][0]["condition"] = (
        'last.note == "a\\"]; end; b-->c %% x" || last.x == "{y}"'
    )
    spec = spec_of(data)
    # The strict grammar admits no raw quote or newline inside a label.
    edges = named_edges(check_mermaid(to_mermaid(spec)))
    assert (
        "classify",
        "fix",
        "last.note == #quot;a\\#quot;]; end; b--#gt;c %% x#quot; #124;#124; last.x == #quot;{y}#quot;",
    ) in edges
    check_dot(to_dot(spec), tmp_path)


# --- agentflow validate -----------------------------------------------------------------


INVALID: dict[str, Any] = {
    "name": "broken",
    "agents": {"a": {"type": "echo"}},
    "planner": {
        "type": "fsm",
        "initial_state": "s1",
        "states": {
            "s1": {
                "agent": "a",
                "on_success": "nowhere",
                "conditional_transitions": [{"condition": "last.x >", "target": "done"}],
            }
        },
        "final_states": ["done"],
    },
}


def test_validate_ok_files(tmp_path: Path) -> None:
    fsm = write(tmp_path, "fsm.yaml", FSM)
    dag = write(tmp_path, "dag.json", json.dumps(DAG))
    result = CliRunner().invoke(cli, ["validate", str(fsm), str(dag)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert re.fullmatch(rf"{re.escape(str(fsm))}: ok \(fsm, 3 agents, hash sha256:[0-9a-f]{{64}}\)", lines[0])
    assert re.fullmatch(rf"{re.escape(str(dag))}: ok \(dag, 3 agents, hash sha256:[0-9a-f]{{64}}\)", lines[1])
    assert spec_of(FSM).spec_hash() in lines[0]


def test_validate_reports_each_problem_with_its_location(tmp_path: Path) -> None:
    ok = write(tmp_path, "ok.yaml", FSM)
    bad = write(tmp_path, "bad.yaml", INVALID)
    result = CliRunner().invoke(cli, ["validate", str(ok), str(bad)])
    assert result.exit_code == 1
    problems = [line for line in result.output.splitlines() if line.startswith(f"{bad}: ")]
    assert any(f"{bad}: planner.states.s1.on_success: unknown state 'nowhere'" == p for p in problems), problems
    assert any(p.startswith(f"{bad}: planner.states.s1.conditional_transitions.0.condition: ") for p in problems)
    assert f"{ok}: ok (" in result.output


def test_validate_exit_codes_for_unreadable_and_not_yaml(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = tmp_path / "missing.yaml"
    result = runner.invoke(cli, ["validate", str(missing), str(write(tmp_path, "bad.yaml", INVALID))])
    assert result.exit_code == 2
    assert f"{missing}: cannot read" in result.stderr
    not_yaml = write(tmp_path, "x.yaml", "name: [unclosed\n")
    result = runner.invoke(cli, ["validate", str(not_yaml)])
    assert result.exit_code == 1 and f"{not_yaml}: body: " in result.output
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert runner.invoke(cli, ["validate", str(binary)]).exit_code == 2
    # A directory is one unreadable file among others, not a usage error.
    ok = write(tmp_path, "ok.yaml", FSM)
    result = runner.invoke(cli, ["validate", str(tmp_path), str(ok)])
    assert result.exit_code == 2 and f"{ok}: ok (" in result.output and f"{tmp_path}: cannot read" in result.stderr
    assert runner.invoke(cli, ["validate"]).exit_code == 2  # usage: FILE... is required


# --- agentflow graph --------------------------------------------------------------------


def test_graph_command_prints_mermaid_and_dot(tmp_path: Path) -> None:
    path = write(tmp_path, "bt.yaml", BT)
    runner = CliRunner()
    result = runner.invoke(cli, ["graph", str(path)])
    assert result.exit_code == 0 and result.output == to_mermaid(spec_of(BT))
    result = runner.invoke(cli, ["graph", str(path), "--format", "dot"])
    assert result.exit_code == 0 and result.output == to_dot(spec_of(BT))
    check_dot(result.output, tmp_path)


def test_graph_command_on_an_invalid_or_missing_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", INVALID)
    result = CliRunner().invoke(cli, ["graph", str(bad)])
    assert result.exit_code == 1 and result.stdout == ""
    assert f"{bad}: planner.states.s1.on_success: unknown state 'nowhere'" in result.stderr
    assert CliRunner().invoke(cli, ["graph", str(tmp_path / "nope.yaml")]).exit_code == 2


# --- agentflow import agentmap ----------------------------------------------------------

CSV = (
    "GraphName,Node,Edge,Context,AgentType,Success_Next,Failure_Next,Input_Fields,Output_Field,Prompt,Description\n"
    "Support,Ask,,,input,Answer,Apologize,,question,What is your question?,\n"
    "Support,Answer,,\"{'provider': 'openai'}\",openai,,Apologize,question,answer,\"Answer: {question}\",Answers\n"
    "Support,Apologize,,,echo,,,question,apology,,\n"
    "Other,X,,,echo,,,,,,\n"
)


def test_import_agentmap_writes_yaml_and_reports_on_stderr(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "flows.csv", CSV)
    result = CliRunner().invoke(cli, ["import", "agentmap", str(csv_path), "--graph", "Support"])
    assert result.exit_code == 0, result.stderr
    spec = parse_workflow(result.stdout)  # stdout is the spec alone (and comments)
    assert spec.name == "Support" and spec.planner.type == "fsm"
    assert result.stdout.startswith("# Imported from AgentMap graph 'Support' (flows.csv)")
    notes = result.stderr.splitlines()
    assert f"{csv_path}: row 3, AgentType 'openai': AgentType 'openai' has no AgentFlow equivalent yet" in "\n".join(
        notes
    )
    assert any("row 2, Prompt" in n for n in notes) and any("row 3, Context" in n for n in notes)
    assert all(n.startswith(f"{csv_path}: ") for n in notes)


def test_import_agentmap_to_a_file(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "flows.csv", CSV)
    out = tmp_path / "support.yaml"
    result = CliRunner().invoke(cli, ["import", "agentmap", str(csv_path), "--graph", "Support", "-o", str(out)])
    assert result.exit_code == 0 and result.stdout == ""
    assert f"wrote {out} (fsm, 3 agents)" in result.stderr
    validated = CliRunner().invoke(cli, ["validate", str(out)])
    assert validated.exit_code == 0 and "ok (fsm, 3 agents" in validated.output


def test_import_agentmap_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    csv_path = write(tmp_path, "flows.csv", CSV)
    result = runner.invoke(cli, ["import", "agentmap", str(csv_path)])
    assert result.exit_code == 1 and result.stdout == ""
    assert f"{csv_path}: graph: several graphs in the CSV, choose one of: Support, Other" in result.stderr
    broken = write(tmp_path, "broken.csv", "GraphName,Node,Success_Next\nG,A,Ghost\n")
    result = runner.invoke(cli, ["import", "agentmap", str(broken)])
    assert result.exit_code == 1 and "row 2.Success_Next: unknown node(s) 'Ghost'" in result.stderr
    assert runner.invoke(cli, ["import", "agentmap", str(tmp_path / "none.csv")]).exit_code == 2


def test_import_agentmap_output_that_does_not_validate_yet(tmp_path: Path) -> None:
    # A routing function is not registered in this environment: the spec is written for
    # editing, its validation errors printed, and the exit code says it is not ready.
    csv_path = write(tmp_path, "route.csv", "GraphName,Node,Edge\nR,A,func:pick\nR,B,\n")
    result = CliRunner().invoke(cli, ["import", "agentmap", str(csv_path)])
    assert result.exit_code == 1
    assert yaml.safe_load(result.stdout)["planner"]["states"]["A"]["router"] == "pick"
    assert "the produced spec does not validate yet" in result.stderr
    assert "planner.states.A.router: no routing function 'pick'" in result.stderr


@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
def test_imported_dag_can_be_drawn(tmp_path: Path, fmt: str) -> None:
    csv_path = write(tmp_path, "par.csv", "GraphName,Node,Success_Next\nP,A,B|C\nP,B,D\nP,C,D\nP,D,\n")
    runner = CliRunner()
    imported = runner.invoke(cli, ["import", "agentmap", str(csv_path), "-o", str(tmp_path / "p.yaml")])
    assert imported.exit_code == 0, imported.stderr
    drawn = runner.invoke(cli, ["graph", str(tmp_path / "p.yaml"), "--format", fmt])
    assert drawn.exit_code == 0
    drawing = check_mermaid(drawn.output) if fmt == "mermaid" else check_dot(drawn.output, tmp_path)
    assert {(s, d) for s, d, _ in named_edges(drawing)} == {
        ("start", "A"),
        ("A", "B"),
        ("A", "C"),
        ("B", "D"),
        ("C", "D"),
    }
