"""The JSON the API answers with, as typed models: FastAPI's OpenAPI page (``/docs``) documents them."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Result(BaseModel):
    path: str = Field(
        description="The image's path as its dataset stores it, or a video's moment (`clip.mp4#t=4.000,8.000`), "
        "as `rank` prints them."
    )
    row: str = Field(description="The row behind it: the image, or a moment's best frame (for /api/similar).")
    score: float = Field(description="Cosine similarity to the query.")
    dataset: int = Field(description="Which dataset served holds it (its place on the command line, from 0).")
    thumb: str = Field(description="The URL of its thumbnail.")


class SearchResponse(BaseModel):
    results: list[Result]
    page: int
    page_size: int
    more: bool = Field(description="Whether the next page holds results.")
    cutoff: float | None = Field(description="The score results had to reach (the larger of min_score and auto).")
    notes: list[str] = Field(description="What the server wants known (an index out of date, say).")


class UploadResponse(BaseModel):
    id: str = Field(description="Pass as `upload` to /api/search; kept for the server's next 256 uploads.")


class Member(BaseModel):
    path: str
    similarity: float = Field(description="To the group's representative (1 for itself).")
    bytes: int | None = Field(
        description="The file's size; null for a video's frame or a shard's sample (no file of its own)."
    )
    thumb: str


class Group(BaseModel):
    group: int
    dataset: int
    members: list[Member] = Field(description="The representative (the largest file) first.")


class DedupResponse(BaseModel):
    groups: list[Group]
    total: int = Field(description="Groups found in all.")
    page: int
    page_size: int
    more: bool
    threshold: float


class Dataset(BaseModel):
    source: str
    rows: int
    index: bool = Field(description="Whether a current index answers its searches.")
    columns: list[str] = Field(description="Its columns beside the embeddings, for `where`.")
    date_column: str | None = Field(description="The column the date filter uses: taken, else mtime.")


class Info(BaseModel):
    model: str
    datasets: list[Dataset]
    max_upload_bytes: int


class Problem(BaseModel):
    detail: str
