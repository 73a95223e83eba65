# Credentials come from the usual AWS chain (AWS_PROFILE, environment, SSO). Tests point the
# provider at a moto server through a generated, git-ignored `*_override.tf`; this block stays clean.
provider "aws" {
  region = var.region

  default_tags {
    tags = local.tags
  }
}
