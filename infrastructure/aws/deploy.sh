#!/usr/bin/env bash
# Deploy the training stack: ./deploy.sh [-e dev|prod] [-r REGION] [--yes] COMMAND
# One Terraform workspace per environment and region (<env>-<region>), so dev and prod, or two
# regions, never share state. Variables: terraform.tfvars (if present), then environments/<env>.tfvars.
set -euo pipefail

cd "$(dirname "$0")"

TERRAFORM="${TERRAFORM:-terraform}"
ENVIRONMENTS=(dev prod)
COMMANDS=(deploy init plan apply outputs destroy validate fmt bake-ami)

usage() {
  cat <<USAGE
usage: $0 [-e dev|prod] [-r REGION] [--yes] COMMAND [-- TERRAFORM_ARGS...]

commands:
  deploy     init, validate, plan, then apply that plan (asks first unless --yes)
  init       install the provider and select the workspace <env>-<region>
  plan       show what would change
  apply      apply changes (asks first unless --yes)
  outputs    print the stack's outputs
  destroy    delete the stack (asks first unless --yes)
  validate   check the configuration
  fmt        format the Terraform files
  bake-ami   build an AMI with everything installed from the deployed stack's launch template
             (a builder instance runs the user data, powers off, is imaged, then terminated);
             set ami_id to the printed id and deploy again

options:
  -e, --env ENV        environment: ${ENVIRONMENTS[*]} (default dev)
  -r, --region REGION  AWS region (default: the tfvars' region, else us-west-2)
  -y, --yes            do not ask for confirmation
  -h, --help           show this help
  -- ARGS              passed on to terraform plan/apply/destroy (e.g. -- -no-color)
USAGE
}

die_usage() {
  echo "error: $*" >&2
  usage >&2
  exit 2
}

die() {
  echo "error: $*" >&2
  exit 1
}

contains() {
  local needle="$1" item
  shift
  for item in "$@"; do [ "${item}" = "${needle}" ] && return 0; done
  return 1
}

ENVIRONMENT=dev
REGION=""
YES=0
COMMAND=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -e | --env) [ $# -ge 2 ] || die_usage "$1 needs a value"; ENVIRONMENT="$2"; shift 2 ;;
    -r | --region) [ $# -ge 2 ] || die_usage "$1 needs a value"; REGION="$2"; shift 2 ;;
    -y | --yes) YES=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die_usage "unknown option $1" ;;
    *) [ -z "${COMMAND}" ] || die_usage "one command at a time (got ${COMMAND} and $1)"; COMMAND="$1"; shift ;;
  esac
done

[ -n "${COMMAND}" ] || die_usage "no command given"
contains "${COMMAND}" "${COMMANDS[@]}" || die_usage "unknown command '${COMMAND}'"
contains "${ENVIRONMENT}" "${ENVIRONMENTS[@]}" || die_usage "unknown environment '${ENVIRONMENT}'"
VAR_FILE="environments/${ENVIRONMENT}.tfvars"
[ -f "${VAR_FILE}" ] || die "missing ${VAR_FILE}"

command -v "${TERRAFORM}" >/dev/null 2>&1 ||
  die "terraform not found on PATH: install Terraform >= 1.5 (https://developer.hashicorp.com/terraform/install)"

# The region names the workspace, so it must be known before Terraform runs.
tfvars_region() {
  sed -n 's/^[[:space:]]*region[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$1" 2>/dev/null | tail -n 1
}
if [ -z "${REGION}" ]; then
  REGION="$(tfvars_region "${VAR_FILE}")"
  [ -n "${REGION}" ] || REGION="$(tfvars_region terraform.tfvars)"
  [ -n "${REGION}" ] || REGION="us-west-2"
fi
[[ "${REGION}" =~ ^[a-z]{2}(-[a-z]+)+-[0-9]$ ]] || die_usage "'${REGION}' is not an AWS region (like us-west-2)"
WORKSPACE="${ENVIRONMENT}-${REGION}"
VARS=(-var-file="${VAR_FILE}" -var "region=${REGION}" "${EXTRA[@]}")

require_credentials() {
  if [ -n "${AWS_ACCESS_KEY_ID:-}" ] || [ -n "${AWS_PROFILE:-}" ] || [ -n "${AWS_WEB_IDENTITY_TOKEN_FILE:-}" ] ||
    [ -n "${AWS_CONTAINER_CREDENTIALS_FULL_URI:-}" ] || [ -n "${AWS_CONTAINER_CREDENTIALS_RELATIVE_URI:-}" ] ||
    [ -f "${AWS_SHARED_CREDENTIALS_FILE:-${HOME}/.aws/credentials}" ] || [ -f "${AWS_CONFIG_FILE:-${HOME}/.aws/config}" ]; then
    return 0
  fi
  die "no AWS credentials found: set AWS_PROFILE, run 'aws configure' or 'aws sso login', or export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
}

confirm() {
  [ "${YES}" -eq 1 ] && return 0
  [ -t 0 ] || die "$1: refusing without a terminal to confirm; pass --yes"
  local answer
  read -r -p "$1 Type '${WORKSPACE}' to continue: " answer
  [ "${answer}" = "${WORKSPACE}" ] || die "not confirmed"
}

# Every command initializes: cheap when nothing changed, and it follows a changed backend.
tf_init() {
  "${TERRAFORM}" init -input=false
  "${TERRAFORM}" workspace select -or-create "${WORKSPACE}"
}

echo "deploy.sh: ${COMMAND} environment=${ENVIRONMENT} region=${REGION} workspace=${WORKSPACE}" >&2
case "${COMMAND}" in
  fmt) "${TERRAFORM}" fmt -recursive ;;
  validate)
    "${TERRAFORM}" init -input=false -backend=false >/dev/null
    "${TERRAFORM}" validate
    ;;
  init) tf_init ;;
  plan)
    require_credentials
    tf_init >/dev/null
    "${TERRAFORM}" plan -input=false "${VARS[@]}"
    ;;
  apply)
    require_credentials
    confirm "Apply changes to ${ENVIRONMENT} in ${REGION}?"
    tf_init >/dev/null
    "${TERRAFORM}" apply -input=false -auto-approve "${VARS[@]}"
    ;;
  deploy)
    require_credentials
    tf_init >/dev/null
    "${TERRAFORM}" validate
    plan_file=".terraform/${WORKSPACE}.tfplan"
    "${TERRAFORM}" plan -input=false -out="${plan_file}" "${VARS[@]}"
    confirm "Apply this plan to ${ENVIRONMENT} in ${REGION}?"
    "${TERRAFORM}" apply -input=false "${EXTRA[@]}" "${plan_file}"
    rm -f "${plan_file}"
    ;;
  outputs)
    tf_init >/dev/null
    "${TERRAFORM}" output
    ;;
  destroy)
    require_credentials
    confirm "Destroy ${ENVIRONMENT} in ${REGION}, checkpoint bucket included?"
    tf_init >/dev/null
    "${TERRAFORM}" destroy -input=false -auto-approve "${VARS[@]}"
    ;;
  bake-ami)
    require_credentials
    command -v aws >/dev/null 2>&1 || die "the AWS CLI is needed for bake-ami (https://aws.amazon.com/cli/)"
    tf_init >/dev/null
    template="$("${TERRAFORM}" output -raw launch_template_id)"
    group="$("${TERRAFORM}" output -raw autoscaling_group_name)"
    security_group="$("${TERRAFORM}" output -raw security_group_id)"
    subnet="$(aws autoscaling describe-auto-scaling-groups --region "${REGION}" --auto-scaling-group-names "${group}" \
      --query 'AutoScalingGroups[0].VPCZoneIdentifier' --output text | cut -d, -f1)"
    [ -n "${subnet}" ] && [ "${subnet}" != "None" ] || die "group ${group} not found: deploy the stack first"
    confirm "Launch an on-demand builder instance from ${template} to bake an AMI?"
    builder="$(aws ec2 run-instances --region "${REGION}" --launch-template "LaunchTemplateId=${template},Version=\$Latest" \
      --network-interfaces "DeviceIndex=0,SubnetId=${subnet},Groups=${security_group},AssociatePublicIpAddress=true,DeleteOnTermination=true" \
      --tag-specifications "ResourceType=instance,Tags=[{Key=MambaBake,Value=true},{Key=Name,Value=${group}-bake}]" \
      --query 'Instances[0].InstanceId' --output text)"
    trap 'aws ec2 terminate-instances --region "${REGION}" --instance-ids "${builder}" >/dev/null' EXIT
    echo "deploy.sh: builder ${builder} installing; it powers off when done" >&2
    for _ in 1 2 3 4; do  # each wait gives up after 10 minutes; an install takes 5-15
      aws ec2 wait instance-stopped --region "${REGION}" --instance-ids "${builder}" && break
    done
    image="$(aws ec2 create-image --region "${REGION}" --instance-id "${builder}" \
      --name "${group}-baked-$(date -u +%Y%m%d-%H%M%S)" --query ImageId --output text)"
    for _ in 1 2 3 4; do
      aws ec2 wait image-available --region "${REGION}" --image-ids "${image}" && break
    done
    echo "baked ${image}: set ami_id = \"${image}\" in ${VAR_FILE} (or terraform.tfvars) and run ./deploy.sh deploy"
    ;;
esac
