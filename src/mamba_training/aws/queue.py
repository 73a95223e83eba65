"""The jobs queue: an SQS queue whose messages name a job id, and nothing else.

A message only says "job X may be runnable": the job's truth is its `state.json` in the jobs
store and who runs it is its `lease.json` (docs/design.md, "Jobs and the fleet"). So a message is
deleted as soon as a job is claimed, and never has to stay invisible for as long as a run lasts
(SQS caps visibility at 12 hours). Duplicates are harmless: a message for a job that is not
queued is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mamba_training.aws.session import client, describe_error
from mamba_training.errors import AwsError, UsageError

_MISSING_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"}


@dataclass(frozen=True)
class Message:
    job_id: str
    receipt: str


class Queue:
    """One SQS queue, by URL; every boto error becomes a one-line AwsError naming the queue."""

    def __init__(self, url: str, region: str | None = None, profile: str | None = None) -> None:
        if not url.startswith(("https://", "http://")):
            raise UsageError(f"queue URL {url!r} is not an SQS URL (expected https://sqs.<region>.amazonaws.com/...)")
        self.url = url
        self._client = client("sqs", region=region or _region_of(url), profile=profile)

    def _errors(self, action: str):
        return _QueueErrors(self.url, action)

    def check(self) -> None:
        """Raise AwsError when the queue does not exist or cannot be reached."""
        with self._errors("reading the queue's attributes"):
            self._client.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"])

    def send(self, job_id: str) -> None:
        with self._errors(f"enqueueing job {job_id}"):
            self._client.send_message(QueueUrl=self.url, MessageBody=json.dumps({"job": job_id}))

    def receive(self, max_messages: int = 10, wait_seconds: int = 20, visibility_seconds: int = 60) -> list[Message]:
        """Up to `max_messages` messages, hidden from others for `visibility_seconds`."""
        with self._errors("receiving from the queue"):
            answer = self._client.receive_message(QueueUrl=self.url, MaxNumberOfMessages=max_messages,
                                                  WaitTimeSeconds=wait_seconds, VisibilityTimeout=visibility_seconds)
        found = []
        for raw in answer.get("Messages", []):
            try:
                job_id = str(json.loads(raw["Body"])["job"])
            except (ValueError, KeyError, TypeError):
                job_id = ""  # not ours: the caller deletes it
            found.append(Message(job_id, raw["ReceiptHandle"]))
        return found

    def delete(self, message: Message) -> None:
        with self._errors("deleting a message"):
            self._client.delete_message(QueueUrl=self.url, ReceiptHandle=message.receipt)

    def release(self, message: Message) -> None:
        """Make a received message visible to other agents again at once."""
        with self._errors("returning a message"):
            self._client.change_message_visibility(QueueUrl=self.url, ReceiptHandle=message.receipt,
                                                   VisibilityTimeout=0)

    def depth(self) -> int:
        """Visible plus in-flight messages (approximate, as SQS reports them)."""
        with self._errors("reading the queue depth"):
            attrs = self._client.get_queue_attributes(
                QueueUrl=self.url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )["Attributes"]
        return int(attrs.get("ApproximateNumberOfMessages", 0)) + int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))


class _QueueErrors:
    """Like `aws_errors`, but a missing queue is named as such."""

    def __init__(self, url: str, action: str) -> None:
        self.url, self.action = url, action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            return False
        from botocore.exceptions import BotoCoreError, ClientError
        from botocore.parsers import ResponseParserError

        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_QUEUE or "NonExistentQueue" in code:
                raise AwsError(f"queue {self.url} does not exist (check --queue or MAMBA_QUEUE_URL)") from None
        if isinstance(error, (BotoCoreError, ClientError)):
            raise describe_error(error, f"{self.action} ({self.url})") from None
        if isinstance(error, ResponseParserError):  # an endpoint's HTML error page
            raise AwsError(f"{self.action} ({self.url}): unreadable answer: {str(error).splitlines()[0][:120]}") from None
        return False


def _region_of(url: str) -> str | None:
    """sqs.<region>.amazonaws.com URLs carry their region; endpoints such as moto's do not."""
    host = url.split("://", 1)[1].split("/", 1)[0]
    parts = host.split(".")
    if len(parts) >= 4 and parts[0] == "sqs":
        return parts[1]
    return None


__all__ = ["Message", "Queue"]
