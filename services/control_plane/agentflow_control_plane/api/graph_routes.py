"""REST API v1: a workflow's plan as a graph (nodes and edges), for drawing it.

The same drawing as ``agentflow graph`` (Mermaid/DOT), as data: the web dashboard lays it
out itself and paints a run's progress onto it, matching nodes to the run's planner
state by ``key`` and to its steps by ``step``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field

from agentflow_control_plane.api.deps import Reader
from agentflow_core.graph import to_json_graph
from agentflow_core.spec import NAME_PATTERN, WorkflowSpec

router = APIRouter(prefix="/v1")

WorkflowName = Annotated[str, Path(pattern=NAME_PATTERN)]


class GraphNodeOut(BaseModel):
    id: str
    label: str = Field(description="The text in the node's box; lines separated by \\n")
    shape: Literal[
        "start", "state", "decision", "final", "failed", "control", "action", "check", "decorator", "planner"
    ]
    plan: int = Field(description="0: the workflow's plan; 1: its fallback plan; 2: the fallback's fallback ...")
    key: str | None = Field(
        description="How the planner's state names the node: FSM state, behavior-tree preorder index, DAG step"
    )
    step: str | None = Field(description="The `state` of the run's steps for this node (see GET /v1/runs/{id})")


class GraphEdgeOut(BaseModel):
    src: str
    dst: str
    label: str | None
    dashed: bool = Field(description="True for the hand-over to a fallback plan")


class GraphPlanOut(BaseModel):
    plan: int
    label: str


class WorkflowGraphOut(BaseModel):
    workflow: str
    version: int
    planner: Literal["fsm", "behavior_tree", "dag", "llm"]
    plans: list[GraphPlanOut]
    nodes: list[GraphNodeOut]
    edges: list[GraphEdgeOut]


@router.get("/workflows/{name}/graph", response_model=WorkflowGraphOut)
async def get_workflow_graph(
    name: WorkflowName, caller: Reader, version: Annotated[int | None, Query(ge=1)] = None
) -> WorkflowGraphOut:
    """The plan of the latest (or given) version as nodes and edges (what ``agentflow graph`` draws)."""
    found = await caller.repo.get_workflow_version(name, version)
    graph = to_json_graph(WorkflowSpec.model_validate(found.spec))
    return WorkflowGraphOut.model_validate({**graph, "workflow": found.name, "version": found.version})
