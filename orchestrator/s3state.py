"""The ledger on S3: records as objects, compare-and-set by conditional PUT (``If-Match`` / ``If-None-Match``)."""

from __future__ import annotations

from dlorch.core.errors import StaleWrite, Unreachable


class S3StateStore:
    """``s3://bucket/prefix/ledger/<key>.json``, written only if the ETag is the one read."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None, client=None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.s3 = client or boto3.client(
            "s3", endpoint_url=endpoint_url,
            config=Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"}))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}.json" if self.prefix else f"{key}.json"

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            obj = self._call(self.s3.get_object, Bucket=self.bucket, Key=self._key(key))
        except _NotFound:
            return None
        return obj["Body"].read(), obj["ETag"]

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        kw = {"Bucket": self.bucket, "Key": self._key(key), "Body": data, "ContentType": "application/json"}
        if if_match is not None:
            kw["IfMatch"] = if_match
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        try:
            return self._call(self.s3.put_object, **kw)["ETag"]
        except _NotFound:  # S3 answers If-Match on a key that is gone with 404: the condition failed
            raise StaleWrite(f"{key} is gone (expected etag {if_match})") from None
        except StaleWrite:
            # Ambiguous: botocore retries a conditional PUT whose first try landed but whose answer was lost,
            # and the retry then fails its own condition. Read back: if the record holds exactly our bytes,
            # the write is ours and it succeeded.
            got = self.get(key)
            if got is not None and got[0] == data and (if_match is not None or if_none_match):
                return got[1]
            raise

    def verify_conditional_writes(self) -> None:
        """Refuse an endpoint that ignores ``If-None-Match`` / ``If-Match``: the ledger's CAS would silently fail.

        Raises:
            BadInput: a conditional PUT that must fail succeeded.
        """
        import uuid

        from dlorch.core.errors import BadInput

        key = self._key(f"_probe/conditional-{uuid.uuid4().hex}")
        self._call(self.s3.put_object, Bucket=self.bucket, Key=key, Body=b"1")
        try:
            for header, condition in (("If-None-Match", {"IfNoneMatch": "*"}),
                                      ("If-Match", {"IfMatch": '"00000000000000000000000000000000"'})):
                try:
                    self._call(self.s3.put_object, Bucket=self.bucket, Key=key, Body=b"2", **condition)
                except StaleWrite:
                    continue  # refused, as it must be
                raise BadInput(f"the S3 endpoint of s3://{self.bucket} ignores conditional writes ({header}); "
                               "the ledger needs them: use AWS S3 or a store that supports conditional PUTs")
        finally:
            try:
                self._call(self.s3.delete_object, Bucket=self.bucket, Key=key)
            except Exception:  # a probe left behind is harmless; the verdict stands
                pass

    def list(self, prefix: str) -> list[str]:
        base = self._key(prefix.rstrip("/") + "/x")[: -len("x.json")]
        keys = []
        for page in self._call(lambda: list(self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base))):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(base):]
                if name.endswith(".json") and "/" not in name:
                    keys.append(f"{prefix.rstrip('/')}/{name[:-5]}")
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._call(self.s3.delete_object, Bucket=self.bucket, Key=self._key(key))  # none there: S3 says 204 too

    def _call(self, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
                raise _NotFound() from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise StaleWrite(f"{kw.get('Key')} changed underneath ({code})") from None
            if code == "NoSuchBucket":
                raise Unreachable(f"bucket {self.bucket!r} does not exist; create it or fix --store") from None
            raise Unreachable(f"S3 error on s3://{self.bucket}/{kw.get('Key', '')}: {code or e}") from None
        except BotoCoreError as e:
            raise Unreachable(f"S3 unreachable for s3://{self.bucket}: {e}; check --store and credentials") from None


class _NotFound(Exception):
    pass
