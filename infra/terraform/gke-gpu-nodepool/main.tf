# The GPU node pool the pipeline's GPU steps and the multi-node SFT job run on.
#
# Agreement with src/cellpuzzles/release/placement.py (checked by tests/test_infra.py):
#   - GKE labels every node with cloud.google.com/gke-nodepool = <pool name>, which is the key of
#     GPU_NODE_SELECTOR: so the pool name is GPU_NODE_POOL.
#   - GKE taints GPU nodes nvidia.com/gpu=present:NoSchedule; it is declared here as well so the
#     taint that GPU_TOLERATION tolerates is visible in code.

resource "google_container_node_pool" "gpu_h100" {
  name           = "cellpuzzles-gpu-h100"
  project        = var.project_id
  location       = var.location
  cluster        = var.cluster_name
  node_locations = var.node_locations

  # Scale to zero when no GPU step runs.
  initial_node_count = 0
  autoscaling {
    min_node_count  = 0
    max_node_count  = var.max_node_count
    location_policy = "ANY"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type = "a3-highgpu-8g" # 8 x H100 80GB, 208 vCPU, 1,872 GB
    spot         = var.spot

    guest_accelerator {
      type  = "nvidia-h100-80gb"
      count = 8
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }

    # Local NVMe SSDs as ephemeral storage (model weights, checkpoints before upload).
    ephemeral_storage_local_ssd_config {
      local_ssd_count = 16
    }
    disk_size_gb = 200
    disk_type    = "pd-balanced"

    taint {
      key    = "nvidia.com/gpu"
      value  = "present"
      effect = "NO_SCHEDULE"
    }

    labels = {
      "cellpuzzles/accelerator" = "nvidia-h100-80gb"
    }

    service_account = var.node_service_account
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    workload_metadata_config {
      mode = "GKE_METADATA" # Workload Identity: pods reach GCS without key files
    }

    shielded_instance_config {
      enable_secure_boot = true
    }
  }
}
