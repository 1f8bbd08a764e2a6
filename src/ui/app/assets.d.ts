// Stylesheets are imported for the bundler (Bun.build emits them as app.css).
declare module "*.css";
