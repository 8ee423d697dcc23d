"""AgentMap CSV import: mapping rules, the report, errors, and that the result runs."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any

import pytest

from agentflow_core.agentmap import END_STATE, FAILED_STATE, ImportIssue, ImportResult, import_agentmap
from agentflow_core.errors import ValidationFailed
from agentflow_core.planners import Decision, StepResult, planner_for
from agentflow_core.planners import fsm as fsm_module
from agentflow_core.spec import NAME_PATTERN, WorkflowSpec, parse_workflow

NOW = 1_000_000
HEADER = (
    "GraphName,Node,Edge,Context,AgentType,Success_Next,Failure_Next,Input_Fields,Output_Field,Prompt,Description\n"
)

# AgentMap's documented weather example, plus a node that always fails and its handler.
WEATHER = HEADER + (
    "WeatherFlow,GetLocation,,Get user location,input,FetchWeather,ErrorHandler,,location,"
    "Enter the city name:,Input node for weather workflow\n"
    "WeatherFlow,FetchWeather,,\"{'api_key': 'env:WEATHER_API'}\",weather_api,GenerateReport,ErrorHandler,"
    "location,weather_data,,Fetches weather data from API\n"
    "WeatherFlow,GenerateReport,,\"{'provider': 'openai'}\",openai,End,ErrorHandler,weather_data|location,"
    'report,"Generate a weather report for {location}.\nKeep it ""short"".",\n'
    "WeatherFlow,ErrorHandler,,,echo,End,,error,error_message,,Error handling node\n"
    "WeatherFlow,End,,,echo,,,report|error_message,output,,Final output node\n"
)

PARALLEL = HEADER + (
    "Par,Split,,,default,TaskA|TaskB|TaskC,Error,data,tasks,,\n"
    "Par,TaskA,,,worker_a,Join,Error,tasks,result_a,,\n"
    "Par,TaskB,,,echo,Join,Error,tasks,result_b,,\n"
    "Par,TaskC,,,echo,Join,Error,tasks,result_c,,\n"
    "Par,Join,,,summary,End,Error,result_a|result_b|result_c,final_result,,\n"
    "Par,Error,,,echo,End,,error,error_message,,\n"
    "Par,End,,,echo,,,final_result|error_message,output,,\n"
)


def messages(result: ImportResult, column: str | None = None) -> list[str]:
    return [i.message for i in result.report if column is None or i.column == column]


def errors_of(csv_text: str, graph: str | None = None) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as info:
        import_agentmap(csv_text, graph)
    details = info.value.details
    assert isinstance(details, list) and details
    return details


@dataclass
class Run:
    path: list[str]  # states dispatched, in order
    decision: Decision  # the last one: it carries the outcome
    inputs: dict[str, Any]  # the input each state's step received

    @property
    def status(self) -> str | None:
        return self.decision.outcome.status if self.decision.outcome else None


def drive(spec: WorkflowSpec, run_input: Any, outputs: dict[str, Any]) -> Run:
    """Run to completion, answering each step with ``outputs[state]`` (an Exception fails
    it); steps in flight together are answered in dispatch order."""
    planner = planner_for(spec)
    decision = planner.start(run_input, NOW)
    queue = deque(decision.dispatch)
    run = Run([], decision, {})
    while decision.outcome is None:
        assert queue, "a run that has not ended must have steps in flight"
        step = queue.popleft()
        run.path.append(step.state)
        run.inputs[step.state] = step.payload["input"]
        out = outputs.get(step.state, {"from": step.state})
        if isinstance(out, Exception):
            result = StepResult(step.seq, "failed", None, str(out))
        else:
            result = StepResult(step.seq, "succeeded", out)
        decision = planner.on_result(decision.state, result, run_input, NOW)
        queue.extend(decision.dispatch)
    run.decision = decision
    return run


# --- FSM --------------------------------------------------------------------------------


def test_realistic_graph_becomes_an_fsm_with_success_and_failure_routes() -> None:
    result = import_agentmap(WEATHER)
    assert result.graph == "WeatherFlow" and result.planner_type == "fsm"
    spec = result.spec
    planner = spec["planner"]
    assert planner["type"] == "fsm" and planner["initial_state"] == "GetLocation"
    states = planner["states"]
    assert list(states) == ["GetLocation", "FetchWeather", "GenerateReport", "ErrorHandler", "End"]
    assert states["GetLocation"]["on_success"] == "FetchWeather"
    assert states["GetLocation"]["on_error"] == "ErrorHandler"
    assert states["GenerateReport"] | {"input": None, "description": None} == {
        "agent": "GenerateReport",
        "description": None,
        "input": None,
        "on_success": "End",
        "on_error": "ErrorHandler",
    }
    # Without Failure_Next a failure ends the run failed; without any next, success ends it.
    assert states["ErrorHandler"]["on_success"] == "End" and states["ErrorHandler"]["on_error"] == FAILED_STATE
    assert (states["End"]["on_success"], states["End"]["on_error"]) == (END_STATE, FAILED_STATE)
    assert planner["final_states"] == {END_STATE: {"status": "succeeded"}, FAILED_STATE: {"status": "failed"}}
    assert {a["type"] for a in spec["agents"].values()} == {"echo"}
    assert set(spec["agents"]) == set(states) and all(states[s]["agent"] == s for s in states)
    assert states["FetchWeather"]["description"] == "Fetches weather data from API"

    parsed = parse_workflow(spec)
    assert parsed.planner.type == "fsm"


def test_input_fields_read_outputs_of_the_node_that_writes_them() -> None:
    states = import_agentmap(WEATHER).spec["planner"]["states"]
    # GetLocation succeeded on every path to FetchWeather: a plain read.
    assert states["FetchWeather"]["input"] == {"location": "outputs.GetLocation"}
    assert states["GenerateReport"]["input"] == {
        "weather_data": "outputs.FetchWeather",
        "location": "outputs.GetLocation",
    }
    # End is reached with either one of them: a missing one reads null, as in AgentMap.
    assert states["End"]["input"] == {
        "report": "has(outputs.GenerateReport) ? outputs.GenerateReport : null",
        "error_message": "has(outputs.ErrorHandler) ? outputs.ErrorHandler : null",
    }
    # Nobody writes 'error' (AgentMap's runtime does): it comes from the run input, reported.
    assert states["ErrorHandler"]["input"] == {"error": "has(input.error) ? input.error : null"}
    # Output_Field is consumed by those mappings, never reported.
    assert not messages(import_agentmap(WEATHER), "Output_Field")


def test_report_lists_every_value_that_did_not_carry_over() -> None:
    result = import_agentmap(WEATHER)
    by_cell = {(i.row, i.column): i for i in result.report}
    llm = by_cell[(4, "AgentType")]
    assert llm.value == "openai"
    assert llm.message == (
        "AgentType 'openai' has no AgentFlow equivalent yet (the LLM agent arrives with the worker-runtime "
        "issue); mapped to an echo placeholder"
    )
    assert "no AgentFlow equivalent yet; mapped to an echo placeholder" in by_cell[(3, "AgentType")].message
    assert "human tasks" in by_cell[(2, "AgentType")].message  # the console 'input' agent
    # Prompts: dropped when the row has a Description, else kept in the state's description.
    assert "dropped" in by_cell[(2, "Prompt")].message
    assert "kept in the state's description" in by_cell[(4, "Prompt")].message
    states = result.spec["planner"]["states"]
    assert states["GenerateReport"]["description"] == (
        'Prompt: Generate a weather report for {location}.\nKeep it "short".'
    )
    for row in (2, 3, 4):
        assert "Context" in by_cell[(row, "Context")].message and "dropped" in by_cell[(row, "Context")].message
    assert (5, "Context") not in by_cell  # empty Context: nothing to report
    assert "fills 'error' itself" in by_cell[(5, "Input_Fields")].message
    assert [(i.row or 0) for i in result.report] == sorted(i.row or 0 for i in result.report)
    # Each issue prints on one line, even for a multi-line cell.
    for issue in result.report:
        assert "\n" not in str(issue) and str(issue).startswith(f"row {issue.row}")


def test_imported_fsm_runs_like_the_agentmap_graph() -> None:
    spec = parse_workflow(import_agentmap(WEATHER).spec)
    run = drive(spec, {"city": "Oslo"}, {"GetLocation": "Oslo", "GenerateReport": "sunny"})
    assert run.path == ["GetLocation", "FetchWeather", "GenerateReport", "End"]
    assert run.status == "succeeded"
    assert run.inputs["FetchWeather"] == {"location": "Oslo"}
    assert run.inputs["End"] == {"report": "sunny", "error_message": None}

    # A failure takes Failure_Next; the handler's success leads on to End: the run succeeds.
    run = drive(spec, {}, {"FetchWeather": RuntimeError("API down")})
    assert run.path == ["GetLocation", "FetchWeather", "ErrorHandler", "End"]
    assert run.status == "succeeded"

    # A failure with no Failure_Next ends the run failed.
    run = drive(spec, {}, {"FetchWeather": RuntimeError("x"), "ErrorHandler": RuntimeError("y")})
    assert run.path == ["GetLocation", "FetchWeather", "ErrorHandler"]
    assert run.status == "failed"


def test_agent_types() -> None:
    csv_text = HEADER + (
        "T,A,,,Default,B,,,,,\n"
        "T,B,,,,C,,,,,\n"
        "T,C,,,success,D,,,,,\n"
        "T,D,,,failure,E,F,,,,\n"
        "T,E,,,branching,,F,,,,\n"
        "T,F,,,claude,,,,,,\n"
    )
    result = import_agentmap(csv_text)
    agents = result.spec["agents"]
    assert agents["A"] == agents["B"] == agents["C"] == {"type": "echo"}
    assert agents["D"]["type"] == "fail" and agents["D"]["times"] >= 1000
    assert agents["E"] == agents["F"] == {"type": "echo"}
    reported = {i.value: i.message for i in result.report if i.column == "AgentType"}
    assert set(reported) == {"branching", "claude"}  # default/empty/success/failure map faithfully
    assert "conditional_transitions" in reported["branching"] and "always succeeds" in reported["branching"]
    assert "LLM agent" in reported["claude"]
    spec = parse_workflow(result.spec)
    run = drive(spec, {}, {"D": RuntimeError("AgentMap failure agent")})
    assert run.path == ["A", "B", "C", "D", "F"]
    assert run.status == "succeeded"


def test_edge_is_the_next_node_for_both_outcomes() -> None:
    csv_text = HEADER + "L,A,B,,,,,,,,\nL,B,C,,,,,,,,\nL,C,,,,,,,,,\n"
    result = import_agentmap(csv_text)
    states = result.spec["planner"]["states"]
    assert (states["A"]["on_success"], states["A"]["on_error"]) == ("B", "B")
    assert not result.report
    parse_workflow(result.spec)


def test_edge_with_success_next_is_reported_and_success_next_wins() -> None:
    csv_text = HEADER + "L,A,C,,,B,,,,,\nL,B,,,,,,,,,\nL,C,,,,,,,,,\n"
    result = import_agentmap(csv_text)
    a = result.spec["planner"]["states"]["A"]
    assert (a["on_success"], a["on_error"]) == ("B", "C")
    [issue] = result.report
    assert (issue.row, issue.column, issue.value) == (2, "Edge", "C")
    assert "InvalidEdgeDefinitionError" not in issue.message and "rejects" in issue.message


def test_func_routing_becomes_the_state_router(monkeypatch: pytest.MonkeyPatch) -> None:
    csv_text = HEADER + (
        "Smart,Classifier,func:choose_specialist,,default,,,user_query,classification,,\n"
        "Smart,Tech,,,echo,Done,,classification,answer,,\n"
        "Smart,Billing,,,echo,Done,,classification,billing,,\n"
        "Smart,Done,,,echo,,,answer,out,,\n"
    )
    result = import_agentmap(csv_text)
    states = result.spec["planner"]["states"]
    assert states["Classifier"]["router"] == "choose_specialist"
    assert "on_success" not in states["Classifier"] and states["Classifier"]["on_error"] == FAILED_STATE
    # Reached only through the router, which runs after the Classifier succeeded.
    assert states["Tech"]["input"] == {"classification": "outputs.Classifier"}
    [issue] = messages(result, "Edge")
    assert "agentflow.routing" in issue and "port it" in issue

    # Valid once the routing function is registered in this environment.
    with pytest.raises(ValidationFailed) as info:
        parse_workflow(result.spec)
    assert any(d["loc"] == "planner.states.Classifier.router" for d in info.value.details)
    monkeypatch.setattr(fsm_module, "load_router", lambda name: lambda output, scope: "Billing")
    spec = parse_workflow(result.spec)
    run = drive(spec, {"user_query": "invoice?"}, {})
    assert run.path == ["Classifier", "Billing", "Done"]
    assert run.status == "succeeded"


def test_failure_next_func_and_two_different_funcs() -> None:
    csv_text = HEADER + "R,A,,,,func:one,func:two,,,,\nR,B,,,,,,,,,\n"
    result = import_agentmap(csv_text)
    a = result.spec["planner"]["states"]["A"]
    assert a["router"] == "one"
    dropped = [i for i in result.report if i.column == "Failure_Next"]
    assert dropped and "one router" in dropped[0].message

    # AgentMap hands a plain Success_Next to the function; AgentFlow's router decides alone.
    result = import_agentmap(HEADER + "R,A,,,,B,func:pick,,,,\nR,B,,,,,,,,,\n")
    a = result.spec["planner"]["states"]["A"]
    assert a["router"] == "pick" and "on_success" not in a and a["on_error"] == FAILED_STATE
    [note] = messages(result, "Failure_Next")
    assert "Success_Next 'B' is not used" in note


def test_unreachable_nodes_are_dropped_and_reported() -> None:
    csv_text = HEADER + "U,A,,,,B,,,,,\nU,B,,,,,,,,,\nU,Orphan,,,,B,,,,,\n"
    result = import_agentmap(csv_text)
    assert "Orphan" not in result.spec["planner"]["states"] and "Orphan" not in result.spec["agents"]
    [issue] = result.report
    assert (issue.row, issue.column, issue.value) == (4, "Node", "Orphan") and "entry node 'A'" in issue.message
    parse_workflow(result.spec)


def test_renames_are_sanitized_unique_and_reported() -> None:
    csv_text = HEADER + (
        "My Flow!,fetch-data,,,,input,,,raw,,\n"
        "My Flow!,input,,,,fetch_data,,raw,x,,\n"
        "My Flow!,fetch_data,,,,2nd step,,,,,\n"
        "My Flow!,2nd step,,,,_hidden,,,,,\n"
        "My Flow!,_hidden,,,,,,,,,\n"
    )
    result = import_agentmap(csv_text)
    spec = result.spec
    assert spec["name"] == "My_Flow_" and re.fullmatch(NAME_PATTERN, spec["name"])
    states = spec["planner"]["states"]
    assert list(states) == ["fetch_data", "input_node", "fetch_data_2", "n2nd_step", "_hidden"]
    assert states["fetch_data"]["on_success"] == "input_node"
    assert states["input_node"]["on_success"] == "fetch_data_2"
    assert states["input_node"]["input"] == {"raw": "outputs.fetch_data"}
    assert all(re.fullmatch(NAME_PATTERN, agent) for agent in spec["agents"])
    assert states["_hidden"]["agent"] == "hidden"
    renamed = {i.value: i.message for i in result.report if i.column == "Node"}
    assert set(renamed) == {"fetch-data", "input", "2nd step", "_hidden", "fetch_data"}
    assert "reserved" in renamed["input"]
    assert "'fetch_data' is taken" in renamed["fetch_data"]
    assert "identifiers" in renamed["fetch-data"] and "letter or digit" in renamed["_hidden"]
    assert any(i.column == "GraphName" and i.value == "My Flow!" for i in result.report)
    parse_workflow(spec)


def test_field_written_by_several_nodes_reads_the_run_input_and_is_reported() -> None:
    csv_text = HEADER + "M,A,,,,B,C,,answer,,\nM,B,,,,D,,,answer,,\nM,C,,,,D,,,answer,,\nM,D,,,,,,answer,,,\n"
    result = import_agentmap(csv_text)
    assert result.spec["planner"]["states"]["D"]["input"] == {"answer": "has(input.answer) ? input.answer : null"}
    [issue] = [i for i in result.report if i.column == "Input_Fields"]
    assert issue.row == 5 and "'A', 'B', 'C'" in issue.message


def test_odd_field_names_and_unknown_columns() -> None:
    csv_text = "GraphName,Node,Input_Fields,Notes\nF,A,user-name|  |ok,hello\n"
    result = import_agentmap(csv_text)
    assert result.spec["planner"]["states"]["A"]["input"] == {
        "user-name": '"user-name" in input ? input["user-name"] : null',
        "ok": "has(input.ok) ? input.ok : null",
    }
    columns = {(i.row, i.column) for i in result.report}
    assert (1, "Notes") in columns and (2, "Input_Fields") in columns
    spec = parse_workflow(result.spec)
    assert drive(spec, {"user-name": "ada"}, {}).inputs["A"] == {"user-name": "ada", "ok": None}


def test_graph_without_an_end_is_reported() -> None:
    result = import_agentmap(HEADER + "Loop,A,B,,,,,,,,\nLoop,B,A,,,,,,,,\n")
    assert any("no node ends the graph" in m for m in messages(result))


# --- DAG --------------------------------------------------------------------------------


def test_parallel_targets_become_a_dag() -> None:
    result = import_agentmap(PARALLEL)
    assert result.planner_type == "dag"
    planner = result.spec["planner"]
    assert planner["type"] == "dag" and planner["success_policy"] == "final_node"
    steps = planner["steps"]
    assert "depends_on" not in steps["Split"] and "condition" not in steps["Split"]
    for task in ("TaskA", "TaskB", "TaskC"):
        assert steps[task]["depends_on"] == ["Split"]
        assert steps[task]["condition"] == 'steps.Split.status == "succeeded"'
        assert steps[task]["input"] == {"tasks": "outputs.Split"}
    assert steps["Join"]["depends_on"] == ["TaskA", "TaskB", "TaskC"]
    assert steps["Join"]["condition"] == (
        'steps.TaskA.status == "succeeded" || steps.TaskB.status == "succeeded" || steps.TaskC.status == "succeeded"'
    )
    assert steps["Error"]["depends_on"] == ["Split", "TaskA", "TaskB", "TaskC", "Join"]
    assert steps["Error"]["condition"].startswith('steps.Split.status == "failed" || steps.TaskA.status == "failed"')
    assert steps["End"]["condition"] == 'steps.Join.status == "succeeded" || steps.Error.status == "succeeded"'
    # The happy-path end is declared last: final_node follows the last step nothing depends on.
    assert list(steps)[-1] == "End"
    # Failure routes map faithfully (trigger all_done): nothing to report about them.
    assert not [i for i in result.report if i.column == "Failure_Next"]
    assert all(s.get("trigger") == "all_done" for s in steps.values() if s.get("depends_on"))


def test_imported_dag_validates_and_runs_the_branches_in_parallel() -> None:
    spec = parse_workflow(import_agentmap(PARALLEL).spec)
    planner = planner_for(spec)
    first = planner.start({"data": [1, 2]}, NOW)
    assert [s.state for s in first.dispatch] == ["Split"]
    second = planner.on_result(first.state, StepResult(1, "succeeded", "split"), {"data": [1, 2]}, NOW)
    assert sorted(s.state for s in second.dispatch) == ["TaskA", "TaskB", "TaskC"]
    run = drive(spec, {"data": [1, 2]}, {"Join": "joined"})
    assert run.path == ["Split", "TaskA", "TaskB", "TaskC", "Join", "End"]
    assert run.status == "succeeded"
    assert run.inputs["Join"] == {
        "result_a": {"from": "TaskA"},
        "result_b": {"from": "TaskB"},
        "result_c": {"from": "TaskC"},
    }
    assert run.inputs["End"] == {"final_result": "joined", "error_message": None}

    # A failed branch takes its failure route (trigger all_done lets the condition decide),
    # and the join still runs on the branches that succeeded, as in AgentMap.
    run = drive(spec, {"data": []}, {"TaskB": RuntimeError("boom")})
    assert "Error" in run.path and run.path[-1] == "End"
    assert run.status == "succeeded"


def test_edge_into_a_dag_step_accepts_both_outcomes_and_func_is_unmappable() -> None:
    csv_text = HEADER + "P,A,,,,B|C,,,,,\nP,B,D,,,,,,,,\nP,C,func:pick,,,,,,,,\nP,D,,,,,,,,,\n"
    result = import_agentmap(csv_text)
    steps = result.spec["planner"]["steps"]
    assert steps["D"]["condition"] == 'steps.B.status in ["succeeded", "failed"]'
    [func] = [i for i in result.report if i.value == "func:pick"]
    assert func.row == 4 and "cannot be mapped" in func.message
    assert any("several nodes end the graph" in m for m in messages(result))
    parse_workflow(result.spec)


def test_parallel_graph_with_a_cycle_is_unmappable() -> None:
    details = errors_of(HEADER + "C,A,,,,B|C,,,,,\nC,B,,,,D,,,,,\nC,C,,,,,,,,,\nC,D,,,,B,,,,,\n")
    [detail] = details
    assert detail["loc"] == "row 3"
    assert "B -> D -> B" in detail["msg"] and "Success_Next 'B|C'" in detail["msg"]


# --- graphs and malformed files ---------------------------------------------------------

TWO_GRAPHS = HEADER + "First,A,,,,B,,,,,\nFirst,B,,,,,,,,,\nSecond,X,,,,,,,,,\n"


def test_graph_selection() -> None:
    assert import_agentmap(TWO_GRAPHS, "Second").spec["planner"]["states"].keys() == {"X"}
    assert import_agentmap(TWO_GRAPHS, "First").spec["name"] == "First"
    [detail] = errors_of(TWO_GRAPHS)
    assert detail["loc"] == "graph" and "First, Second" in detail["msg"]
    [detail] = errors_of(TWO_GRAPHS, "Third")
    assert detail["loc"] == "graph" and "Third" in detail["msg"] and "First, Second" in detail["msg"]


def test_unknown_targets_are_named() -> None:
    details = errors_of(HEADER + "G,A,,,,B|Ghost,Nowhere,,,,\nG,B,Phantom,,,,,,,,\n")
    assert {d["loc"] for d in details} == {"row 2.Success_Next", "row 2.Failure_Next", "row 3.Edge"}
    text = " ".join(d["msg"] for d in details)
    assert "'Ghost'" in text and "'Nowhere'" in text and "'Phantom'" in text and "'B'" not in text


@pytest.mark.parametrize(
    ("csv_text", "loc", "needle"),
    [
        ("Node,AgentType\nA,echo\n", "row 1", "missing required column(s) GraphName"),
        ("", "row 1", "empty"),
        (HEADER + "G,,,,,,,,,,\n", "row 2.Node", "is empty"),
        (HEADER + ",A,,,,,,,,,\n", "row 2.GraphName", "is empty"),
        (HEADER + "G,A,,,,,,,,,\nG,A,,,,,,,,,\n", "row 3.Node", "duplicate node 'A' (first defined on row 2)"),
        (HEADER + "G,A,,,,,,,,,,extra\n", "row 2", "12 values but the header has 11 columns"),
        (HEADER + 'G,"A,,,,,,,,,\n', "row 2", "not valid CSV"),
        (HEADER + "G,A,,,,B||C,,,,,\nG,B,,,,,,,,,\nG,C,,,,,,,,,\n", "row 2.Success_Next", "empty target"),
        (HEADER + "G,A,,,,func:f|B,,,,,\nG,B,,,,,,,,,\n", "row 2.Success_Next", "alone in its cell"),
        (HEADER + "G,A,func:,,,,,,,,\n", "row 2.Edge", "alone in its cell"),
        (HEADER + "G,A,,,,B|func:f,,,,,\nG,B,,,,,,,,,\n", "row 2.Success_Next", "cannot be combined"),
        ("GraphName,Node,node\nG,A,B\n", "row 1.Node", "twice"),
    ],
)
def test_malformed_csv_is_rejected_naming_row_and_column(csv_text: str, loc: str, needle: str) -> None:
    details = errors_of(csv_text)
    assert any(d["loc"] == loc and needle in d["msg"] for d in details), details


def test_all_problems_are_reported_at_once_in_row_order() -> None:
    details = errors_of(HEADER + "G,A,,,,Ghost,,,,,\nG,,,,,,,,,,\nG,A,,,,,,,,,\n")
    assert [d["loc"] for d in details] == ["row 2.Success_Next", "row 3.Node", "row 4.Node"]


def test_headers_are_matched_loosely_and_blank_lines_skipped() -> None:
    csv_text = "\ufeff\ngraphname, node ,success next\n\nG,A,B\nG,B,\n"
    result = import_agentmap(csv_text)
    assert result.spec["planner"]["states"]["A"]["on_success"] == "B"
    parse_workflow(result.spec)


def test_issue_text() -> None:
    assert str(ImportIssue(3, "Prompt", "a\nb", "dropped")) == "row 3, Prompt 'a\\nb': dropped"
    assert str(ImportIssue(None, None, "", "several ends")) == "graph: several ends"
    long = str(ImportIssue(2, "Context", "x" * 100, "m"))
    assert "..." in long and len(long) < 90
