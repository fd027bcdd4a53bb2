output "node_pool_name" {
  description = "Pool name: the value of the cloud.google.com/gke-nodepool label on its nodes."
  value       = google_container_node_pool.gpu_h100.name
}
