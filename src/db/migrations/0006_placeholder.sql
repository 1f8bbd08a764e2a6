-- placeholder for a migration another branch adds; drop at merge
SELECT 1;
