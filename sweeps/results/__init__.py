"""Using a finished sweep: the best student (choice, verification, export), the report and the method
comparison."""
