-- Placeholder, drop at merge: stands in for the 0005 migration another branch adds, so 0006 applies here.
SELECT 1;
