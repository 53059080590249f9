"""The adaptive audit (`notsure audit`): white-box attacks that know the score and the served
T, run resumably plan by plan (`plans`), checked against independent attacks and the live
service, summed up in docs/robustness/."""
