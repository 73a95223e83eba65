terraform {
  # The stack needs 1.5; the plan-time tests under tests/ use mock providers (`terraform test`, 1.7+).
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}
