variable "project_id" {
  description = "Google Cloud project that owns the GKE cluster."
  type        = string
}

variable "region" {
  description = "Region of the cluster (a regional cluster) or its zone's region."
  type        = string
  default     = "us-central1"
}

variable "location" {
  description = "Location of the cluster: a region (regional cluster) or a zone."
  type        = string
  default     = "us-central1"
}

variable "node_locations" {
  description = "Zones inside location that have H100 capacity (a3-highgpu), e.g. [\"us-central1-a\"]."
  type        = list(string)
  default     = ["us-central1-a"]
}

variable "cluster_name" {
  description = "Name of the existing GKE cluster (Standard mode) that runs Kubeflow and KServe."
  type        = string
}

variable "max_node_count" {
  description = "Autoscaling ceiling per zone: 2 covers the 2-node DeepSpeed SFT job (infra/k8s/sft-multinode.yaml)."
  type        = number
  default     = 2
}

variable "spot" {
  description = "Use Spot VMs (cheaper, can be preempted; steps are resumable from checkpoints)."
  type        = bool
  default     = false
}

variable "node_service_account" {
  description = "Email of the Google service account the GPU nodes run as (least privilege: logging, monitoring, Artifact/Container Registry read)."
  type        = string
}
