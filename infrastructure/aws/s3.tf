################################################################################
# Checkpoint bucket: versioned, encrypted, private, TLS only
################################################################################

resource "aws_s3_bucket" "checkpoints" {
  #checkov:skip=CKV_AWS_18:Access logging needs a second log bucket; CloudTrail data events are the audit trail if wanted.
  #checkov:skip=CKV_AWS_144:Cross-region replication of checkpoints doubles storage cost; losing a region loses hours of training, not data that cannot be recomputed.
  #checkov:skip=CKV_AWS_145:SSE-S3 is the default; set kms_key_arn for SSE-KMS.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket event notifications.
  bucket_prefix = "${local.name}-ckpt-"
  force_destroy = var.force_destroy_bucket
}

resource "aws_s3_bucket_ownership_controls" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = var.kms_key_arn != null
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id

  # Versioning keeps what retention deletes (pruned checkpoints) and every replaced latest.json as
  # noncurrent versions; they are billed storage, so they go after a short undo window (1 day by
  # default), and the delete markers left behind go once no version remains under them.
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }

    expiration {
      expired_object_delete_marker = true
    }
  }

  # A preempted instance can leave a multipart upload of a checkpoint shard behind.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.checkpoints]
}

# Requests made over plain HTTP are denied (S3 answers them "AccessDenied"). A local endpoint
# served over HTTP (moto, LocalStack: `deploy.sh --endpoint URL`) sets deny_insecure_transport =
# false, or nothing could reach the bucket there.
data "aws_iam_policy_document" "bucket" {
  count = var.deny_insecure_transport ? 1 : 0

  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.checkpoints.arn,
      "${aws_s3_bucket.checkpoints.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "checkpoints" {
  count = var.deny_insecure_transport ? 1 : 0

  bucket = aws_s3_bucket.checkpoints.id
  policy = data.aws_iam_policy_document.bucket[0].json

  # S3 rejects a policy while the public access block is being written.
  depends_on = [aws_s3_bucket_public_access_block.checkpoints]
}
