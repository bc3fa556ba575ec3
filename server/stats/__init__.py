"""The coordinator half of each federated statistic: from summed site aggregates to estimates."""
